// blocksparse_moe._routing_host: the routing functors of routing.h run by plain host loops (g++ only, no CUDA).
// It exists to prove the C++ routing logic against the PyTorch specification on machines without a GPU.
#include <vector>

#include "bindings.h"

namespace bsm {
namespace {

struct HostExecutor {
  template <typename F>
  void for_each(int64_t n, const F& f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }

  void exclusive_scan(const int32_t* in, int32_t* out, int64_t n) const {
    int32_t sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t value = in[i];
      out[i] = sum;
      sum += value;
    }
  }

  // Stable counting sort: offsets[key] is the first sorted position of each key.
  void sort_pairs(const int32_t* keys, const int32_t* values, int32_t* sorted_keys, int32_t* sorted_values, int64_t n,
                  int64_t num_experts, const int32_t* offsets) const {
    std::vector<int64_t> cursor(offsets, offsets + num_experts + 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t position = cursor[keys[i]]++;
      sorted_keys[position] = keys[i];
      sorted_values[position] = values[i];
    }
  }
};

void plan_routing_host(std::uintptr_t top_k_index, const std::string& index_dtype, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts, int64_t block_size, int64_t blocks_per_expert, int64_t max_rows,
                       const Buffers& outputs) {
  const RoutingShape shape =
      parse_shape(index_dtype, num_tokens, top_k, num_experts, block_size, blocks_per_expert, max_rows);
  const RoutingBuffers buffers = parse_buffers(shape, top_k_index, outputs);
  py::gil_scoped_release release;
  const int64_t A = shape.assignments();
  std::vector<int32_t> keys(A), values(A), sorted_keys(A), sorted_values(A), padded_counts(num_experts + 1);
  HostExecutor executor;
  plan_routing(executor, shape, buffers,
               RoutingScratch{keys.data(), values.data(), sorted_keys.data(), sorted_values.data(),
                              padded_counts.data()});
}

}  // namespace
}  // namespace bsm

PYBIND11_MODULE(_routing_host, m) {
  m.doc() = "Routing plan for dropless MoE, host build of csrc/routing.h (for tests; CPU pointers).";
  m.def("plan_routing", &bsm::plan_routing_host, bsm::kPlanDoc, BSM_PLAN_ARGS);
  bsm::define_common(m);
}
