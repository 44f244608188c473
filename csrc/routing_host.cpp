// blocksparse_moe._routing_host: the routing steps of routing.h run by plain host loops (g++ only, no CUDA).
// It exists to prove the C++ routing logic against the PyTorch specification on machines without a GPU: both as
// the whole plan (plan_routing) and step by step, by name (run_step), which is how the tests drive
// blocksparse_moe/routing/jit.py's launch sequence on the CPU.
#include <functional>

#include "bindings.h"

namespace bsm {
namespace {

template <typename Step>
void run_on_host(const RoutingParams& p) {
  const int64_t n = Step::extent(p);
  for (int64_t i = 0; i < n; ++i) Step{}(p, i);
}

struct HostExecutor {
  template <typename Step>
  void run(const RoutingParams& p) const {
    run_on_host<Step>(p);
  }
};

void plan_routing_host(std::uintptr_t top_k_index, const std::string& index_dtype, int64_t num_tokens, int64_t top_k,
                       int64_t num_experts, int64_t block_size, int64_t max_rows, const Buffers& buffers) {
  const RoutingShape shape = parse_shape(index_dtype, num_tokens, top_k, num_experts, block_size, max_rows);
  const RoutingParams params = parse_params(shape, top_k_index, buffers);
  py::gil_scoped_release release;
  HostExecutor executor;
  plan_routing(executor, params);
}

struct NamedStep {
  std::function<int64_t(const RoutingParams&)> extent;
  std::function<void(const RoutingParams&)> run;
};

const NamedStep& named_step(const std::string& name) {
  static const std::map<std::string, NamedStep> steps{
#define BSM_HOST_STEP(step_name, Step) {#step_name, NamedStep{&Step::extent, &run_on_host<Step>}},
      BSM_ROUTING_STEPS(BSM_HOST_STEP)
#undef BSM_HOST_STEP
  };
  const auto it = steps.find(name);
  if (it == steps.end()) {
    std::string known;
    for (const auto& [step_name, step] : steps) known += (known.empty() ? "" : ", ") + step_name;
    invalid("unknown routing step '", name, "'; expected one of: ", known);
  }
  return it->second;
}

// Test hooks: the RoutingParams at `params` (host memory, host buffers) are trusted as they are.
void run_step(const std::string& name, std::uintptr_t params) {
  const NamedStep& step = named_step(name);
  py::gil_scoped_release release;
  step.run(*reinterpret_cast<const RoutingParams*>(params));
}

int64_t step_extent(const std::string& name, std::uintptr_t params) {
  return named_step(name).extent(*reinterpret_cast<const RoutingParams*>(params));
}

}  // namespace
}  // namespace bsm

PYBIND11_MODULE(_routing_host, m) {
  m.doc() = "Routing plan for dropless MoE, host build of csrc/routing.h (for tests; CPU pointers).";
  m.def("plan_routing", &bsm::plan_routing_host, bsm::kPlanDoc, BSM_PLAN_ARGS);
  bsm::define_common(m);
  m.def("run_step", &bsm::run_step,
        "Run one step of routing.h by name (as routing/jit.py launches it) on the RoutingParams at address `params` "
        "(host pointers; unchecked: a test hook).",
        bsm::py::arg("name"), bsm::py::arg("params"));
  m.def("step_extent", &bsm::step_extent, "The index range of one step for the RoutingParams at `params`.",
        bsm::py::arg("name"), bsm::py::arg("params"));
}
