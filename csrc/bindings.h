// Argument validation and pybind11 glue shared by _routing_host and _routing_cuda.
//
// Python passes raw pointers (tensor.data_ptr()) and sizes; no libtorch. Every buffer arrives as
// name -> (pointer, number of elements) and is checked against the size the plan needs, so a wrong buffer is a
// ValueError (std::invalid_argument), never an out-of-bounds write.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "routing.h"

namespace bsm {

namespace py = pybind11;

using Buffer = std::pair<std::uintptr_t, int64_t>;  // (data pointer, number of int32 elements)
using Buffers = std::map<std::string, Buffer>;

constexpr int64_t kInt32Limit = (int64_t{1} << 31) - 1;  // largest value an int32 index holds

template <typename... Parts>
[[noreturn]] void invalid(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}

// The bound of routing.spec.max_block_rows: min(A, (A + E*(B-1)) // B).
inline int64_t max_block_rows(int64_t assignments, int64_t num_experts, int64_t block_size) {
  return std::min(assignments, (assignments + num_experts * (block_size - 1)) / block_size);
}

inline void check_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) invalid(name, " must be in [", lo, ", ", hi, "], got ", value);
}

inline RoutingShape parse_shape(const std::string& index_dtype, int64_t num_tokens, int64_t top_k,
                                int64_t num_experts, int64_t block_size, int64_t max_rows) {
  if (index_dtype != "int32" && index_dtype != "int64") {
    invalid("index_dtype must be 'int32' or 'int64', got '", index_dtype, "'");
  }
  check_range("num_tokens", num_tokens, 0, kInt32Limit);
  check_range("top_k", top_k, 1, kInt32Limit);
  check_range("num_experts", num_experts, 1, kInt32Limit - 1);
  check_range("block_size", block_size, 1, kInt32Limit);
  RoutingShape s{num_tokens, top_k, num_experts, block_size, max_rows, index_dtype == "int64", 0, 0, 0, 0};
  if (s.assignments() > kInt32Limit - 1) {
    invalid("num_tokens * top_k must be at most 2**31 - 2 (int32 indices), got ", s.assignments());
  }
  const int64_t expected_rows = max_block_rows(s.assignments(), num_experts, block_size);
  if (max_rows != expected_rows) {
    invalid("max_block_rows must be min(A, (A + E*(B-1)) // B) = ", expected_rows, " for A=", s.assignments(),
            ", E=", num_experts, ", B=", block_size, ", got ", max_rows);
  }
  if (s.padded_rows() > kInt32Limit) {
    invalid("max_block_rows * block_size must fit int32 (<= 2**31 - 1), got ", s.padded_rows());
  }
  sort_layout(s);
  return s;
}

// The buffers a plan of shape s needs, with their element counts, in table order (BSM_ROUTING_BUFFERS; exposed as
// buffer_sizes(), which a test compares with routing/spec.py).
inline std::vector<std::pair<std::string, int64_t>> expected_buffers(const RoutingShape& s) {
  return {
#define BSM_BUFFER_SIZE(name, kind, numel) {#name, numel},
      BSM_ROUTING_BUFFERS(BSM_BUFFER_SIZE)
#undef BSM_BUFFER_SIZE
  };
}

inline std::string joined_names(const RoutingShape& s) {
  std::string names;
  for (const auto& [name, numel] : expected_buffers(s)) names += (names.empty() ? "" : ", ") + name;
  return names;
}

// One buffer of `buffers` by name, checked against the element count the plan needs.
inline int32_t* parse_buffer(const Buffers& buffers, const RoutingShape& s, const char* name, int64_t numel) {
  const auto it = buffers.find(name);
  if (it == buffers.end()) invalid("buffers is missing '", name, "'; expected exactly: ", joined_names(s));
  const auto [ptr, received] = it->second;
  if (received != numel) invalid("buffer '", name, "' must have ", numel, " int32 elements, got ", received);
  if (numel > 0 && (ptr == 0 || ptr % 4 != 0)) {
    invalid("buffer '", name, "' must be a non-null pointer aligned to 4 bytes, got ", ptr);
  }
  return reinterpret_cast<int32_t*>(ptr);
}

inline RoutingParams parse_params(const RoutingShape& s, std::uintptr_t top_k_index, const Buffers& buffers) {
  const int64_t item = s.index_is_int64 ? 8 : 4;
  if (s.assignments() > 0 && (top_k_index == 0 || top_k_index % item != 0)) {
    invalid("top_k_index must be a non-null pointer aligned to ", item, " bytes, got ", top_k_index);
  }
  RoutingBuffers b{};
  b.top_k_index = reinterpret_cast<const void*>(top_k_index);
#define BSM_PARSE_BUFFER(name, kind, numel) b.name = parse_buffer(buffers, s, #name, numel);
  BSM_ROUTING_BUFFERS(BSM_PARSE_BUFFER)
#undef BSM_PARSE_BUFFER
  const auto expected = expected_buffers(s);
  for (const auto& [name, buffer] : buffers) {
    const auto known = [&name = name](const auto& entry) { return entry.first == name; };
    if (std::none_of(expected.begin(), expected.end(), known)) {
      invalid("unknown buffer '", name, "'; expected exactly: ", joined_names(s));
    }
  }
  return RoutingParams{s, b};
}

// The arguments of plan_routing common to both modules (pybind11 keyword names).
#define BSM_PLAN_ARGS                                                                                     \
  bsm::py::arg("top_k_index"), bsm::py::arg("index_dtype"), bsm::py::arg("num_tokens"), bsm::py::arg("top_k"), \
      bsm::py::arg("num_experts"), bsm::py::arg("block_size"), bsm::py::arg("max_block_rows"),             \
      bsm::py::arg("buffers")

constexpr const char* kPlanDoc = R"doc(Build the routing plan into caller-allocated int32 buffers.

top_k_index: data pointer of the contiguous [num_tokens, top_k] ids (index_dtype 'int32' or 'int64').
max_block_rows: routing.spec.max_block_rows(num_tokens * top_k, num_experts, block_size).
buffers: {name: (data_ptr, numel)} for every buffer of csrc/routing.h's BSM_ROUTING_BUFFERS table: the plan's
(counts [E+1] with counts[E] = invalid ids, offsets, ..., row_token, ...) and the scratch of the counting sort
(buffer_sizes() lists them all, in order). The block-sparse topology is padded_offsets: it has no buffers of its own.
Raises ValueError on any inconsistent argument.)doc";

// buffer_sizes(index_dtype, ...): [(name, numel)] of the buffers plan_routing expects for these sizes.
inline std::vector<std::pair<std::string, int64_t>> buffer_sizes(const std::string& index_dtype, int64_t num_tokens,
                                                                 int64_t top_k, int64_t num_experts,
                                                                 int64_t block_size, int64_t max_rows) {
  return expected_buffers(parse_shape(index_dtype, num_tokens, top_k, num_experts, block_size, max_rows));
}

// The functions both modules define besides plan_routing.
inline void define_common(py::module_& m) {
  m.def("buffer_sizes", &buffer_sizes,
        "[(name, numel)] of the int32 buffers plan_routing expects, in order (the C++ side of "
        "routing.spec.PLAN_BUFFERS and SCRATCH_BUFFERS).",
        py::arg("index_dtype"), py::arg("num_tokens"), py::arg("top_k"), py::arg("num_experts"), py::arg("block_size"),
        py::arg("max_block_rows"));
  m.def("params_bytes", []() { return sizeof(RoutingParams); }, "sizeof(RoutingParams), the struct every step takes.");
}

}  // namespace bsm
