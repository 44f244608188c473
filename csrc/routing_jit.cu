// The NVRTC translation unit of the cupy backend (blocksparse_moe/routing/jit.py): every step of routing.h as an
// extern "C" kernel `bsm_<name>` taking the RoutingParams by value. routing/jit.py compiles this file at first use for
// the device's architecture (routing.h is passed to NVRTC as a named header; no CUDA header is needed) and
// launches the kernels in the order of routing.h's plan_routing, on PyTorch's current stream.
#include "routing.h"

#define BSM_JIT_KERNEL(name, Step) \
  extern "C" __global__ void __launch_bounds__(256) bsm_##name(const ::bsm::RoutingParams p) { \
    ::bsm::run_step_on_device<Step>(p);                                                        \
  }
BSM_ROUTING_STEPS(BSM_JIT_KERNEL)
#undef BSM_JIT_KERNEL
