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

// The bound of routing.max_block_rows: min(A, (A + E*(B-1)) // B).
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

// The buffers a plan of shape s needs, with their element counts, in the order of routing.PLAN_BUFFERS and
// SCRATCH_BUFFERS (exposed as buffer_sizes(); a test compares the two).
inline std::vector<std::pair<std::string, int64_t>> expected_buffers(const RoutingShape& s) {
  const int64_t A = s.assignments(), E = s.num_experts;
  return {
      {"counts", E + 1},
      {"offsets", E + 1},
      {"padded_offsets", E + 1},
      {"row_assignment", A},
      {"assignment_row", A},
      {"padded_row_assignment", s.padded_rows()},
      {"padded_assignment_row", A},
      {"keys", A},
      {"rank", A},
      {"tile_counts", s.num_tiles * s.bins()},
      {"group_counts", s.num_groups * s.bins()},
  };
}

inline std::string joined_names(const RoutingShape& s) {
  std::string names;
  for (const auto& [name, numel] : expected_buffers(s)) names += (names.empty() ? "" : ", ") + name;
  return names;
}

inline RoutingParams parse_params(const RoutingShape& s, std::uintptr_t top_k_index, const Buffers& buffers) {
  const int64_t item = s.index_is_int64 ? 8 : 4;
  if (s.assignments() > 0 && (top_k_index == 0 || top_k_index % item != 0)) {
    invalid("top_k_index must be a non-null pointer aligned to ", item, " bytes, got ", top_k_index);
  }
  std::map<std::string, int32_t*> pointers;
  for (const auto& [name, numel] : expected_buffers(s)) {
    const auto it = buffers.find(name);
    if (it == buffers.end()) invalid("buffers is missing '", name, "'; expected exactly: ", joined_names(s));
    const auto [ptr, received] = it->second;
    if (received != numel) invalid("buffer '", name, "' must have ", numel, " int32 elements, got ", received);
    if (numel > 0 && (ptr == 0 || ptr % 4 != 0)) {
      invalid("buffer '", name, "' must be a non-null pointer aligned to 4 bytes, got ", ptr);
    }
    pointers[name] = reinterpret_cast<int32_t*>(ptr);
  }
  for (const auto& [name, buffer] : buffers) {
    if (pointers.count(name) == 0) invalid("unknown buffer '", name, "'; expected exactly: ", joined_names(s));
  }
  auto get = [&](const char* name) { return pointers.at(name); };  // every name is present (checked above)
  const RoutingBuffers b{reinterpret_cast<const void*>(top_k_index),
                         get("counts"),
                         get("offsets"),
                         get("padded_offsets"),
                         get("row_assignment"),
                         get("assignment_row"),
                         get("padded_row_assignment"),
                         get("padded_assignment_row"),
                         get("keys"),
                         get("rank"),
                         get("tile_counts"),
                         get("group_counts")};
  return RoutingParams{s, b};
}

// The arguments of plan_routing common to both modules (pybind11 keyword names).
#define BSM_PLAN_ARGS                                                                                     \
  bsm::py::arg("top_k_index"), bsm::py::arg("index_dtype"), bsm::py::arg("num_tokens"), bsm::py::arg("top_k"), \
      bsm::py::arg("num_experts"), bsm::py::arg("block_size"), bsm::py::arg("max_block_rows"),             \
      bsm::py::arg("buffers")

constexpr const char* kPlanDoc = R"doc(Build the routing plan into caller-allocated int32 buffers.

top_k_index: data pointer of the contiguous [num_tokens, top_k] ids (index_dtype 'int32' or 'int64').
max_block_rows: routing.max_block_rows(num_tokens * top_k, num_experts, block_size).
buffers: {name: (data_ptr, numel)} for counts [E+1] (counts[E] = invalid ids), offsets, padded_offsets,
row_assignment, assignment_row, padded_row_assignment, padded_assignment_row, and the scratch of the counting
sort (buffer_sizes() lists them all). The block-sparse topology is padded_offsets: it has no buffers of its own.
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
        "[(name, numel)] of the int32 buffers plan_routing expects, in order (the C++ side of routing.PLAN_BUFFERS "
        "and SCRATCH_BUFFERS).",
        py::arg("index_dtype"), py::arg("num_tokens"), py::arg("top_k"), py::arg("num_experts"), py::arg("block_size"),
        py::arg("max_block_rows"));
  m.def("params_bytes", []() { return sizeof(RoutingParams); }, "sizeof(RoutingParams), the struct every step takes.");
}

}  // namespace bsm
