// Routing plan for dropless MoE: the logic, written once as per-element functors.
//
// Every step is a functor `f(i)` over one index range; an executor runs it (host: a loop, CUDA: a kernel) and
// supplies the two primitives that are not per-element: a stable sort of (key, value) pairs by key and an
// exclusive scan. `plan_routing<Executor>` below is the whole algorithm; it matches `_plan_routing_torch` and
// `build_topology` in blocksparse_moe/routing.py element for element (read that file for the spec).
//
// Glossary (T tokens, k choices, E experts, B block size, A = T*k assignments, nb column blocks per expert,
// R = max_block_rows, P = R*B padded rows, nnz_max = R*nb):
//   key[a]            expert id of assignment a, or E when it lies outside [0, E) (invalid ids sort last)
//   counts[E+1]       histogram of key; counts[E] counts invalid assignments
//   offsets[E+1]      exclusive scan of counts (offsets[E] = first invalid sorted row)
//   padded_offsets    exclusive scan of counts rounded up to multiples of B (invalid bin excluded)
// int32 everywhere; 64-bit where a product can exceed 2^31 (the caller checks that results fit int32).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define BSM_HD __host__ __device__ __forceinline__
#else
#define BSM_HD inline
#endif

namespace bsm {

// counts[bin] += 1: atomicAdd on the device, a plain add on the host (host loops are sequential).
BSM_HD void atomic_add_one(int32_t* counts, int32_t bin) {
#ifdef __CUDA_ARCH__
  atomicAdd(counts + bin, 1);
#else
  counts[bin] += 1;
#endif
}

// Raw pointers of every buffer of one plan (all int32, caller-allocated with the sizes in the comments), in the
// order of routing.PLAN_BUFFERS + TOPOLOGY_BUFFERS (blocksparse_moe/routing.py; a test checks the order).
struct RoutingBuffers {
  const void* top_k_index;         // [A] int32 or int64
  int32_t* counts;                 // [E+1]
  int32_t* offsets;                // [E+1]
  int32_t* padded_offsets;         // [E+1]
  int32_t* row_assignment;         // [A]
  int32_t* assignment_row;         // [A]
  int32_t* padded_row_assignment;  // [P]
  int32_t* padded_assignment_row;  // [A]
  // Topology (only when nb > 0).
  int32_t* row_indices;       // [nnz_max]
  int32_t* column_indices;    // [nnz_max]
  int32_t* row_offsets;       // [R+1]
  int32_t* row_indices_t;     // [nnz_max]
  int32_t* column_indices_t;  // [nnz_max]
  int32_t* column_offsets_t;  // [E*nb+1]
  int32_t* block_offsets_t;   // [nnz_max]
};

// Sizes of one plan (validated by the caller: see bindings.h).
struct RoutingShape {
  int64_t num_tokens;         // T
  int64_t top_k;              // k
  int64_t num_experts;        // E
  int64_t block_size;         // B
  int64_t blocks_per_expert;  // nb (0 = no topology)
  int64_t max_block_rows;     // R
  bool index_is_int64;

  int64_t assignments() const { return num_tokens * top_k; }
  int64_t padded_rows() const { return max_block_rows * block_size; }
  int64_t nnz_max() const { return max_block_rows * blocks_per_expert; }
};

// Temporaries of the sort/scan steps (owned by the executor's caller).
struct RoutingScratch {
  int32_t* keys;           // [A]
  int32_t* values;         // [A] 0..A-1
  int32_t* sorted_keys;    // [A]
  int32_t* sorted_values;  // [A] the assignments in sorted order
  int32_t* padded_counts;  // [E+1]
};

struct Fill {
  int32_t* out;
  int32_t value;
  BSM_HD void operator()(int64_t i) const { out[i] = value; }
};

// Sort keys (invalid ids -> E), identity values, and the histogram.
template <typename Index>
struct Keys {
  const Index* top_k_index;
  int64_t num_experts;
  int32_t* keys;
  int32_t* values;
  int32_t* counts;
  BSM_HD void operator()(int64_t a) const {
    const Index id = top_k_index[a];
    const int32_t key = (id >= 0 && static_cast<int64_t>(id) < num_experts) ? static_cast<int32_t>(id)
                                                                              : static_cast<int32_t>(num_experts);
    keys[a] = key;
    values[a] = static_cast<int32_t>(a);
    atomic_add_one(counts, key);
  }
};

// Each expert's count rounded up to a multiple of B; the invalid bin E gets no padded rows.
struct PadCounts {
  const int32_t* counts;
  int64_t num_experts;
  int64_t block_size;
  int32_t* padded_counts;
  BSM_HD void operator()(int64_t e) const {
    const int64_t n = e < num_experts ? counts[e] : 0;
    padded_counts[e] = static_cast<int32_t>((n + block_size - 1) / block_size * block_size);
  }
};

// Per sorted row i: the unpadded / padded row maps (mutually inverse on valid assignments).
// padded_row_assignment must be filled with -1 first (padding rows keep it).
struct RowMaps {
  const int32_t* sorted_keys;
  const int32_t* sorted_assignment;
  const int32_t* offsets;
  const int32_t* padded_offsets;
  int64_t num_experts;
  int32_t* row_assignment;
  int32_t* assignment_row;
  int32_t* padded_row_assignment;
  int32_t* padded_assignment_row;
  BSM_HD void operator()(int64_t i) const {
    const int32_t a = sorted_assignment[i];
    const int32_t e = sorted_keys[i];
    const int32_t row = static_cast<int32_t>(i);
    if (e < num_experts) {
      const int32_t padded_row = padded_offsets[e] + (row - offsets[e]);
      row_assignment[i] = a;
      assignment_row[a] = row;
      padded_row_assignment[padded_row] = a;
      padded_assignment_row[a] = padded_row;
    } else {
      row_assignment[i] = -1;
      assignment_row[a] = -1;
      padded_assignment_row[a] = -1;
    }
  }
};

// First block row of expert e.
BSM_HD int64_t block_row_offset(const int32_t* padded_offsets, int64_t block_size, int64_t e) {
  return padded_offsets[e] / block_size;
}

// The last expert e in [0, E) whose first block row is <= r (the owner of block row r when r is used).
BSM_HD int64_t expert_of_block_row(const int32_t* padded_offsets, int64_t block_size, int64_t num_experts,
                                   int64_t r) {
  int64_t lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (block_row_offset(padded_offsets, block_size, mid) <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Per row-major block slot b: its indices, and its column-major position t (identity on unused slots).
struct Blocks {
  const int32_t* padded_offsets;
  int64_t num_experts;
  int64_t block_size;
  int64_t nb;
  int32_t* row_indices;
  int32_t* column_indices;
  int32_t* row_indices_t;
  int32_t* column_indices_t;
  int32_t* block_offsets_t;
  BSM_HD void operator()(int64_t b) const {
    const int64_t r = b / nb, j = b % nb;
    const int64_t used_rows = block_row_offset(padded_offsets, block_size, num_experts);
    int64_t row = -1, col = -1, t = b;
    if (r < used_rows) {
      const int64_t e = expert_of_block_row(padded_offsets, block_size, num_experts, r);
      const int64_t first = block_row_offset(padded_offsets, block_size, e);
      const int64_t nrows = block_row_offset(padded_offsets, block_size, e + 1) - first;
      row = r;
      col = e * nb + j;
      t = nb * first + j * nrows + (r - first);
    }
    row_indices[b] = static_cast<int32_t>(row);
    column_indices[b] = static_cast<int32_t>(col);
    row_indices_t[t] = static_cast<int32_t>(row);
    column_indices_t[t] = static_cast<int32_t>(col);
    block_offsets_t[t] = static_cast<int32_t>(b);
  }
};

// row_offsets[r] = min(r, used rows) * nb, r in [0, R].
struct RowOffsets {
  const int32_t* padded_offsets;
  int64_t num_experts;
  int64_t block_size;
  int64_t nb;
  int32_t* row_offsets;
  BSM_HD void operator()(int64_t r) const {
    const int64_t used_rows = block_row_offset(padded_offsets, block_size, num_experts);
    row_offsets[r] = static_cast<int32_t>((r < used_rows ? r : used_rows) * nb);
  }
};

// column_offsets_t[c]: start of block column c = e*nb + j in column-major order, c in [0, E*nb].
struct ColumnOffsets {
  const int32_t* padded_offsets;
  int64_t num_experts;
  int64_t block_size;
  int64_t nb;
  int32_t* column_offsets_t;
  BSM_HD void operator()(int64_t c) const {
    const int64_t e = c / nb, j = c % nb;
    int64_t start = nb * block_row_offset(padded_offsets, block_size, num_experts);  // c = E*nb: the end
    if (e < num_experts) {
      const int64_t first = block_row_offset(padded_offsets, block_size, e);
      const int64_t nrows = block_row_offset(padded_offsets, block_size, e + 1) - first;
      start = nb * first + j * nrows;
    }
    column_offsets_t[c] = static_cast<int32_t>(start);
  }
};

// The whole plan. Executor provides:
//   for_each(n, f)                                  f(i) for i in [0, n)
//   exclusive_scan(in, out, n)                      int32 exclusive prefix sum
//   sort_pairs(keys, values, sorted_keys, sorted_values, n, num_experts, offsets)
//       stable by key, keys in [0, num_experts]; offsets = exclusive scan of the key histogram
template <typename Executor>
void plan_routing(Executor& ex, const RoutingShape& s, const RoutingBuffers& o, const RoutingScratch& w) {
  const int64_t A = s.assignments(), E = s.num_experts, B = s.block_size, nb = s.blocks_per_expert;

  ex.for_each(E + 1, Fill{o.counts, 0});
  if (s.index_is_int64) {
    ex.for_each(A, Keys<int64_t>{static_cast<const int64_t*>(o.top_k_index), E, w.keys, w.values, o.counts});
  } else {
    ex.for_each(A, Keys<int32_t>{static_cast<const int32_t*>(o.top_k_index), E, w.keys, w.values, o.counts});
  }
  ex.exclusive_scan(o.counts, o.offsets, E + 1);
  ex.for_each(E + 1, PadCounts{o.counts, E, B, w.padded_counts});
  ex.exclusive_scan(w.padded_counts, o.padded_offsets, E + 1);

  ex.sort_pairs(w.keys, w.values, w.sorted_keys, w.sorted_values, A, E, o.offsets);
  ex.for_each(s.padded_rows(), Fill{o.padded_row_assignment, -1});
  ex.for_each(A, RowMaps{w.sorted_keys, w.sorted_values, o.offsets, o.padded_offsets, E, o.row_assignment,
                         o.assignment_row, o.padded_row_assignment, o.padded_assignment_row});

  if (nb > 0) {
    ex.for_each(s.nnz_max(), Blocks{o.padded_offsets, E, B, nb, o.row_indices, o.column_indices, o.row_indices_t,
                                    o.column_indices_t, o.block_offsets_t});
    ex.for_each(s.max_block_rows + 1, RowOffsets{o.padded_offsets, E, B, nb, o.row_offsets});
    ex.for_each(E * nb + 1, ColumnOffsets{o.padded_offsets, E, B, nb, o.column_offsets_t});
  }
}

}  // namespace bsm
