// blocksparse_moe._routing_cuda: the routing steps of routing.h launched as CUDA kernels (one grid-stride kernel
// per step) on the caller's stream. Every buffer, scratch included, comes from the caller, sized from shapes:
// no allocation, no host query, no host synchronization; cudart is linked statically.
#include <cuda_runtime.h>

#include "bindings.h"

namespace bsm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // a grid-stride loop covers the rest

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

template <typename Step>
__global__ void __launch_bounds__(kThreads) step_kernel(const RoutingParams p) {
  run_step_on_device<Step>(p);
}

struct CudaExecutor {
  cudaStream_t stream;

  template <typename Step>
  void run(const RoutingParams& p) const {
    const int64_t n = Step::extent(p);
    if (n == 0) return;
    const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
    step_kernel<Step><<<blocks, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "routing kernel launch");
  }
};

void plan_routing_cuda(std::uintptr_t top_k_index, const std::string& index_dtype, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts, int64_t block_size, int64_t max_rows, const Buffers& buffers,
                       std::uintptr_t stream) {
  const RoutingShape shape = parse_shape(index_dtype, num_tokens, top_k, num_experts, block_size, max_rows);
  const RoutingParams params = parse_params(shape, top_k_index, buffers);
  py::gil_scoped_release release;
  CudaExecutor executor{reinterpret_cast<cudaStream_t>(stream)};
  plan_routing(executor, params);
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
  m.doc() = "Routing plan for dropless MoE on CUDA (csrc/routing.h steps as kernels), raw device pointers.";
  m.def("plan_routing", &bsm::plan_routing_cuda, bsm::kPlanDoc, BSM_PLAN_ARGS, bsm::py::arg("stream"));
  bsm::define_common(m);
  m.def("device_count", &bsm::device_count,
        "Visible CUDA devices; 0 means no CUDA device (no GPU or no sufficient driver), never an error.");
}
