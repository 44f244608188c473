// blocksparse_moe._routing_cuda: the routing functors of routing.h launched as CUDA kernels, with CUB's stable
// radix sort and exclusive scan, on the caller's stream. Temporary storage comes from a caller-provided
// workspace of workspace_bytes(A, E) bytes. No host synchronization; cudart is linked statically.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "bindings.h"

namespace bsm {
namespace {

constexpr int kThreads = 256;
constexpr std::size_t kAlign = 256;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

template <typename F>
__global__ void for_each_kernel(int64_t n, F f) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) f(i);
}

// Bits of the sort keys, which lie in [0, E]: ceil(log2(E + 1)).
int key_bits(int64_t num_experts) {
  int bits = 0;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

std::size_t align_up(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// CUB's temporary storage for the sort of A pairs and the scan of E+1 counts (a host-side size query).
std::size_t cub_temp_bytes(int64_t assignments, int64_t num_experts) {
  std::size_t sort_bytes = 0, scan_bytes = 0;
  if (assignments > 0) {
    check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), static_cast<int>(assignments), 0,
                                               key_bits(num_experts)),
               "cub::DeviceRadixSort::SortPairs size query");
  }
  check_cuda(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), static_cast<int>(num_experts + 1)),
             "cub::DeviceScan::ExclusiveSum size query");
  return std::max(sort_bytes, scan_bytes);
}

// Workspace layout: keys [A], values [A], sorted_keys [A], sorted_values [A], padded_counts [E+1], CUB temp; each
// 256-byte aligned.
std::size_t workspace_bytes(int64_t assignments, int64_t num_experts) {
  check_range("num_assignments", assignments, 0, kInt32Limit - 1);
  check_range("num_experts", num_experts, 1, kInt32Limit - 1);
  const std::size_t a = align_up(sizeof(int32_t) * assignments);
  return 4 * a + align_up(sizeof(int32_t) * (num_experts + 1)) + cub_temp_bytes(assignments, num_experts);
}

struct CudaExecutor {
  cudaStream_t stream;
  void* temp;
  std::size_t temp_bytes;

  template <typename F>
  void for_each(int64_t n, const F& f) const {
    if (n == 0) return;
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    for_each_kernel<<<blocks, kThreads, 0, stream>>>(n, f);
    check_cuda(cudaGetLastError(), "routing kernel launch");
  }

  void exclusive_scan(const int32_t* in, int32_t* out, int64_t n) const {
    std::size_t bytes = temp_bytes;
    check_cuda(cub::DeviceScan::ExclusiveSum(temp, bytes, in, out, static_cast<int>(n), stream),
               "cub::DeviceScan::ExclusiveSum");
  }

  void sort_pairs(const int32_t* keys, const int32_t* values, int32_t* sorted_keys, int32_t* sorted_values, int64_t n,
                  int64_t num_experts, const int32_t* /*offsets*/) const {
    if (n == 0) return;
    std::size_t bytes = temp_bytes;
    check_cuda(cub::DeviceRadixSort::SortPairs(temp, bytes, keys, sorted_keys, values, sorted_values,
                                               static_cast<int>(n), 0, key_bits(num_experts), stream),
               "cub::DeviceRadixSort::SortPairs");
  }
};

void plan_routing_cuda(std::uintptr_t top_k_index, const std::string& index_dtype, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts, int64_t block_size, int64_t blocks_per_expert, int64_t max_rows,
                       const Buffers& outputs, std::uintptr_t workspace, int64_t workspace_size,
                       std::uintptr_t stream) {
  const RoutingShape shape =
      parse_shape(index_dtype, num_tokens, top_k, num_experts, block_size, blocks_per_expert, max_rows);
  const RoutingBuffers buffers = parse_buffers(shape, top_k_index, outputs);
  const int64_t A = shape.assignments();
  const auto needed = static_cast<int64_t>(workspace_bytes(A, num_experts));
  if (workspace_size < needed) {
    invalid("workspace must hold workspace_bytes(", A, ", ", num_experts, ") = ", needed, " bytes, got ",
            workspace_size);
  }
  if (workspace == 0 || workspace % kAlign != 0) {
    invalid("workspace must be a non-null pointer aligned to ", kAlign, " bytes, got ", workspace);
  }
  py::gil_scoped_release release;
  auto* base = reinterpret_cast<char*>(workspace);
  const std::size_t a = align_up(sizeof(int32_t) * A);
  const RoutingScratch scratch{reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base + a),
                               reinterpret_cast<int32_t*>(base + 2 * a), reinterpret_cast<int32_t*>(base + 3 * a),
                               reinterpret_cast<int32_t*>(base + 4 * a)};
  const std::size_t used = 4 * a + align_up(sizeof(int32_t) * (num_experts + 1));
  CudaExecutor executor{reinterpret_cast<cudaStream_t>(stream), base + used, static_cast<std::size_t>(needed) - used};
  plan_routing(executor, shape, buffers, scratch);
}

// Number of visible CUDA devices; 0 when there is no device or no (sufficient) driver.
int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // reset the runtime's last-error state
    return 0;
  }
  check_cuda(err, "cudaGetDeviceCount");
  return count;
}

}  // namespace
}  // namespace bsm

PYBIND11_MODULE(_routing_cuda, m) {
  m.doc() = "Routing plan for dropless MoE on CUDA (csrc/routing.h functors + CUB), raw device pointers.";
  m.def("plan_routing", &bsm::plan_routing_cuda, bsm::kPlanDoc, BSM_PLAN_ARGS, bsm::py::arg("workspace"),
        bsm::py::arg("workspace_bytes"), bsm::py::arg("stream"));
  bsm::define_common(m);
  m.def("workspace_bytes", &bsm::workspace_bytes,
        "Bytes of the device workspace plan_routing needs for num_assignments pairs and num_experts experts "
        "(CUB's host-side size query; needs a CUDA device).",
        bsm::py::arg("num_assignments"), bsm::py::arg("num_experts"));
  m.def("device_count", &bsm::device_count,
        "Visible CUDA devices; 0 means no CUDA device (no GPU or no sufficient driver), never an error.");
}
