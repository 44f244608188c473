// Routing plan for dropless MoE: the logic, written once as steps over one parameter struct.
//
// A step is a struct with `static int64_t extent(const RoutingParams&)` and `operator()(const RoutingParams&, i)`
// for i in [0, extent): every index is independent of the others within a step, and each step sees everything
// the steps before it wrote. An executor runs the steps in the order of `plan_routing` below: host loops
// (_routing_host), CUDA kernels (_routing_cuda, nvcc) or the same kernels compiled at run time with NVRTC
// (csrc/routing_jit.cu, driven by blocksparse_moe/routing/jit.py, which launches these steps by name in this order).
// The result matches blocksparse_moe/routing/pytorch.py element for element (blocksparse_moe/routing/spec.py is
// the spec). The block-sparse topology needs no step: it is padded_offsets plus sizes, and the kernels compute
// every block index from it in closed form. No CUB, no host-side queries: every buffer is sized from shapes by the
// caller.
//
// The sort is a stable counting sort by expert, built from per-element steps:
//   keys:      key[a] (the expert id, or E when outside [0, E)), its rank among the earlier assignments of its
//              tile with the same key, and a per-tile histogram (atomic adds; order-independent, so deterministic)
//   tile_scan: per (group of tiles, key): exclusive scan of the tile histogram along the tiles of the group
//   counts:    per key: exclusive scan of the group totals; the total is counts[key]
//   offsets:   per key: offsets / padded_offsets as a sum over the lower keys
//   place:     row(a) = offsets[key] + group prefix + tile prefix + rank: stable by key, then assignment index
//
// Glossary (T tokens, k choices, E experts, B block size, A = T*k assignments, R = max_block_rows, P = R*B padded
// rows; tiles of tile_size assignments, groups of tiles_per_group tiles; H = num_tiles*(E+1)):
//   key[a]            expert id of assignment a, or E when it lies outside [0, E) (invalid ids sort last)
//   counts[E+1]       histogram of key; counts[E] counts invalid assignments
//   offsets[E+1]      exclusive scan of counts[:E] (offsets[E] = first invalid sorted row)
//   padded_offsets    exclusive scan of counts[:E] rounded up to multiples of B
// int32 buffers; 64-bit index arithmetic where a product can exceed 2^31 (the caller checks that values fit).
#pragma once

#ifdef __CUDACC_RTC__  // NVRTC: no standard headers needed (nor shipped)
namespace bsm {
using int32_t = int;
using int64_t = long long;
}  // namespace bsm
#else
#include <cstdint>
namespace bsm {
using std::int32_t;
using std::int64_t;
}  // namespace bsm
#endif

#ifdef __CUDACC__
#define BSM_HD __host__ __device__ __forceinline__
#else
#define BSM_HD inline
#endif

namespace bsm {

// Sizes of one plan, including the layout of the counting sort (see sort_layout). Only 64-bit members: the
// layout of RoutingParams is then the same for every compiler and for the numpy dtype routing/jit.py builds from the
// names (in this order; a test checks it).
struct RoutingShape {
  int64_t num_tokens;       // T
  int64_t top_k;            // k
  int64_t num_experts;      // E
  int64_t block_size;       // B
  int64_t max_block_rows;   // R
  int64_t index_is_int64;   // 1: top_k_index is int64, 0: int32
  int64_t tile_size;        // assignments per tile of the counting sort
  int64_t num_tiles;        // ceil(A / tile_size)
  int64_t tiles_per_group;  // tiles scanned by one thread in tile_scan
  int64_t num_groups;       // ceil(num_tiles / tiles_per_group)

  BSM_HD int64_t assignments() const { return num_tokens * top_k; }
  BSM_HD int64_t padded_rows() const { return max_block_rows * block_size; }
  BSM_HD int64_t bins() const { return num_experts + 1; }
};

// The one table of buffers (all int32, caller-allocated): X(name, kind, number of elements for the RoutingShape s),
// kind `plan` (the plan's outputs) or `scratch` (the counting sort's). It generates RoutingBuffers,
// expected_buffers and parse_params (bindings.h); blocksparse_moe/routing/spec.py's PLAN_BUFFERS and
// SCRATCH_BUFFERS are the same table in the same order (a test reads both).
#define BSM_ROUTING_BUFFERS(X)                                                                          \
  X(counts, plan, s.bins())                     /* tokens per expert, then the invalid count */         \
  X(offsets, plan, s.bins())                    /* exclusive scan of counts[:E] */                      \
  X(padded_offsets, plan, s.bins())             /* the same, each expert rounded up to B rows */        \
  X(row_assignment, plan, s.assignments())      /* sorted row -> assignment, -1 for invalid */          \
  X(row_token, plan, s.assignments())           /* sorted row -> token (assignment / k), -1 */          \
  X(assignment_row, plan, s.assignments())      /* assignment -> sorted row, -1 for invalid */          \
  X(padded_row_assignment, plan, s.padded_rows()) /* padded row -> assignment, -1 for padding */        \
  X(padded_row_token, plan, s.padded_rows())    /* padded row -> token, -1 for padding */               \
  X(padded_assignment_row, plan, s.assignments()) /* assignment -> padded row, -1 for invalid */        \
  X(keys, scratch, s.assignments())             /* sort key of each assignment (E when invalid) */      \
  X(rank, scratch, s.assignments())             /* rank among the earlier assignments of its tile */    \
  X(tile_counts, scratch, s.num_tiles * s.bins()) /* per tile and key, then scanned within the group */ \
  X(group_counts, scratch, s.num_groups * s.bins()) /* per group and key, then scanned over groups */

// Raw pointers of every buffer of one plan: the input, then BSM_ROUTING_BUFFERS in order.
struct RoutingBuffers {
  const void* top_k_index;  // [A] int32 or int64
#define BSM_BUFFER_FIELD(name, kind, numel) int32_t* name;
  BSM_ROUTING_BUFFERS(BSM_BUFFER_FIELD)
#undef BSM_BUFFER_FIELD
};

// What every step receives (by value, on the device).
struct RoutingParams {
  RoutingShape shape;
  RoutingBuffers buffers;
};

// The counting sort's layout for A assignments onto E experts: tiles of 256*ceil((E+1)/1024) assignments keep
// tile_counts at most ~4*A + E + 1 entries, and groups of ~sqrt(num_tiles) tiles keep every sequential loop of
// tile_scan and counts at ~sqrt(num_tiles) iterations. (routing.spec.PlanSizes computes the same.)
BSM_HD void sort_layout(RoutingShape& s) {
  const int64_t A = s.assignments();
  s.tile_size = 256 * ((s.num_experts + 1 + 1023) / 1024);
  s.num_tiles = (A + s.tile_size - 1) / s.tile_size;
  int64_t g = 1;
  while (g * g < s.num_tiles) ++g;  // ceil(sqrt(num_tiles)), at least 1
  s.tiles_per_group = g;
  s.num_groups = (s.num_tiles + g - 1) / g;
}

BSM_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
BSM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// counts[bin] += 1: atomicAdd on the device, a plain add on the host (host loops are sequential).
BSM_HD void atomic_add_one(int32_t* counts, int64_t bin) {
#ifdef __CUDA_ARCH__
  atomicAdd(counts + bin, 1);
#else
  counts[bin] += 1;
#endif
}

// The sort key of an expert id: the id when it lies in [0, E), else E.
template <typename Index>
BSM_HD int32_t key_of(Index id, int64_t num_experts) {
  return (id >= 0 && static_cast<int64_t>(id) < num_experts) ? static_cast<int32_t>(id)
                                                              : static_cast<int32_t>(num_experts);
}

// -1 in every padded row (the rows place does not fill stay padding) and a zero tile histogram.
struct Init {
  static BSM_HD int64_t extent(const RoutingParams& p) {
    return max64(p.shape.num_tiles * p.shape.bins(), p.shape.padded_rows());
  }
  BSM_HD void operator()(const RoutingParams& p, int64_t i) const {
    if (i < p.shape.num_tiles * p.shape.bins()) p.buffers.tile_counts[i] = 0;
    if (i < p.shape.padded_rows()) {
      p.buffers.padded_row_assignment[i] = -1;
      p.buffers.padded_row_token[i] = -1;
    }
  }
};

// Per assignment a: its key, its rank within its tile, and the tile histogram.
template <typename Index>
struct Keys {
  static BSM_HD int64_t extent(const RoutingParams& p) { return p.shape.assignments(); }
  BSM_HD void operator()(const RoutingParams& p, int64_t a) const {
    const Index* ids = static_cast<const Index*>(p.buffers.top_k_index);
    const int64_t E = p.shape.num_experts;
    const int64_t tile = a / p.shape.tile_size;
    const int32_t key = key_of(ids[a], E);
    int32_t rank = 0;
    for (int64_t j = tile * p.shape.tile_size; j < a; ++j) rank += key_of(ids[j], E) == key ? 1 : 0;
    p.buffers.keys[a] = key;
    p.buffers.rank[a] = rank;
    atomic_add_one(p.buffers.tile_counts + tile * p.shape.bins(), key);
  }
};

// Per (group g, key e), e fastest: exclusive scan of tile_counts[t][e] over the tiles t of group g, in place; the
// group's total goes to group_counts[g][e].
struct TileScan {
  static BSM_HD int64_t extent(const RoutingParams& p) { return p.shape.num_groups * p.shape.bins(); }
  BSM_HD void operator()(const RoutingParams& p, int64_t i) const {
    const int64_t bins = p.shape.bins(), g = i / bins, e = i % bins;
    const int64_t first = g * p.shape.tiles_per_group;
    const int64_t last = min64(first + p.shape.tiles_per_group, p.shape.num_tiles);
    int32_t sum = 0;
    for (int64_t t = first; t < last; ++t) {
      int32_t& count = p.buffers.tile_counts[t * bins + e];
      const int32_t value = count;
      count = sum;
      sum += value;
    }
    p.buffers.group_counts[i] = sum;
  }
};

// Per key e: exclusive scan of group_counts[g][e] over the groups, in place; the total is counts[e].
struct Counts {
  static BSM_HD int64_t extent(const RoutingParams& p) { return p.shape.bins(); }
  BSM_HD void operator()(const RoutingParams& p, int64_t e) const {
    const int64_t bins = p.shape.bins();
    int32_t sum = 0;
    for (int64_t g = 0; g < p.shape.num_groups; ++g) {
      int32_t& count = p.buffers.group_counts[g * bins + e];
      const int32_t value = count;
      count = sum;
      sum += value;
    }
    p.buffers.counts[e] = sum;
  }
};

// Per e in [0, E]: offsets[e] and padded_offsets[e], sums over the experts below e (O(E) each, E+1 in parallel).
struct Offsets {
  static BSM_HD int64_t extent(const RoutingParams& p) { return p.shape.bins(); }
  BSM_HD void operator()(const RoutingParams& p, int64_t e) const {
    const int64_t B = p.shape.block_size;
    int64_t sum = 0, padded = 0;
    for (int64_t j = 0; j < e; ++j) {  // e <= E: the invalid bin E never contributes
      const int64_t n = p.buffers.counts[j];
      sum += n;
      padded += (n + B - 1) / B * B;
    }
    p.buffers.offsets[e] = static_cast<int32_t>(sum);
    p.buffers.padded_offsets[e] = static_cast<int32_t>(padded);
  }
};

// Per assignment a: its sorted row (stable by key, then a), and the unpadded / padded row maps and row tokens (mutually inverse
// on valid assignments; invalid assignments get -1 and the invalid rows after the valid ones).
struct Place {
  static BSM_HD int64_t extent(const RoutingParams& p) { return p.shape.assignments(); }
  BSM_HD void operator()(const RoutingParams& p, int64_t a) const {
    const RoutingBuffers& o = p.buffers;
    const int64_t bins = p.shape.bins();
    const int32_t e = o.keys[a];
    const int64_t tile = a / p.shape.tile_size, group = tile / p.shape.tiles_per_group;
    const int32_t row = o.offsets[e] + o.group_counts[group * bins + e] + o.tile_counts[tile * bins + e] + o.rank[a];
    if (e < p.shape.num_experts) {
      const int32_t padded_row = o.padded_offsets[e] + (row - o.offsets[e]);
      const int32_t token = static_cast<int32_t>(a / p.shape.top_k);
      o.row_assignment[row] = static_cast<int32_t>(a);
      o.row_token[row] = token;
      o.assignment_row[a] = row;
      o.padded_row_assignment[padded_row] = static_cast<int32_t>(a);
      o.padded_row_token[padded_row] = token;
      o.padded_assignment_row[a] = padded_row;
    } else {
      o.row_assignment[row] = -1;
      o.row_token[row] = -1;
      o.assignment_row[a] = -1;
      o.padded_assignment_row[a] = -1;
    }
  }
};

// Every step by name, for the executors that run them by name (the NVRTC build exports `bsm_<name>`, the host
// module's run_step(name, ...) runs the same loops in the tests).
#define BSM_ROUTING_STEPS(X)              \
  X(init, ::bsm::Init)                    \
  X(keys_i32, ::bsm::Keys<::bsm::int32_t>) \
  X(keys_i64, ::bsm::Keys<::bsm::int64_t>) \
  X(tile_scan, ::bsm::TileScan)           \
  X(counts, ::bsm::Counts)                \
  X(offsets, ::bsm::Offsets)              \
  X(place, ::bsm::Place)

#ifdef __CUDACC__
// One step as a grid-stride loop: any grid computes every index (the grid only sets the speed).
template <typename Step>
__device__ __forceinline__ void run_step_on_device(const RoutingParams& p) {
  const int64_t n = Step::extent(p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) Step{}(p, i);
}
#endif

#ifndef __CUDACC_RTC__
// The whole plan. Executor provides `template <typename Step> void run(const RoutingParams&)`, which must finish
// (or order, on a stream) each step before the next. routing/jit.py launches the same steps in the same order.
template <typename Executor>
void plan_routing(Executor& ex, const RoutingParams& p) {
  ex.template run<Init>(p);
  if (p.shape.index_is_int64) {
    ex.template run<Keys<int64_t>>(p);
  } else {
    ex.template run<Keys<int32_t>>(p);
  }
  ex.template run<TileScan>(p);
  ex.template run<Counts>(p);
  ex.template run<Offsets>(p);
  ex.template run<Place>(p);
}
#endif

}  // namespace bsm
