// The CPU kernels' interface between the ATen entry points (contrastive_cpu.cpp, built for any
// x86-64 or other CPU) and the instruction-set variants (contrastive_cpu_kernels.cpp, built once
// per variant with that variant's flags and chosen at run time).
//
// Everything that crosses this line is plain data: raw pointers, integers and function pointers.
// A variant's translation unit includes no ATen, pybind11 or standard container headers, so that
// no inline function of a shared header is compiled with a variant's instructions and then picked
// by the linker for every caller (an AVX-512 copy of std::vector's growth code would crash an
// AVX2 machine).
#pragma once

#include <cstdint>
#include <type_traits>

namespace suncet::cpu {

// Lane integers of the key and group comparisons: as wide as the accumulation type, so that a
// vector of ids has as many lanes as a vector of values.
template <typename T>
using LaneId = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Every per-row and per-column array handed to a variant holds this many readable entries past
// its last row: a variant reads whole vectors and whole column tiles beyond the last row.
constexpr int64_t kAttributePad = 512;

// A dead gradient offset: exp2(s - offset) is exactly 0, for rows that receive no gradient.
template <typename T>
constexpr T kDeadOffset = T(1e30);

// Keys and groups of rows (q) and columns (k) as lane integers that compare equal exactly when
// the original int64 values do; each array is padded by kAttributePad zeros.
template <typename T, int P>
struct Layout {
  const LaneId<T>* row_key[P];
  const LaneId<T>* col_key[P];
  const LaneId<T>* row_group;
  const LaneId<T>* col_group;
  int64_t rows, cols, self_offset;
};

// Per row of q and membership code c (bit p set: the entry is a positive of key set p), the
// offset (log2 units) and coefficient of the gradient entries (contrastive_cpu.cpp,
// gradient_tables); each array padded by kAttributePad dead entries.
template <typename T, int P>
struct GradientTables {
  const T* offset[1 << P];
  const T* coef[1 << P];
};

template <typename T, int P>
struct ForwardCall {
  const T* q;  // [rows, d], contiguous
  const T* k;  // [cols, d], contiguous (q itself with one tower)
  int64_t d;
  Layout<T, P> layout;
  double tau;
  int threads;
  T* loss;       // [rows, P]
  bool* valid;   // [rows, P]
  T* lse_all;    // [rows]
  T* lse_pos;    // [rows, P]
};

template <typename T, int P>
struct BackwardCall {
  const T* q;
  const T* k;
  int64_t d;
  Layout<T, P> layout;
  GradientTables<T, P> tables;
  double tau;
  int threads;
  bool one_tower;
  T* dq;  // [rows, d]: with one tower the whole gradient (G + G^T) q / tau
  T* dk;  // [cols, d]; unused with one tower
};

// One instruction-set variant: its name and its entry points for fp32 and fp64, one and two key sets.
struct Variant {
  const char* name;
  void (*forward_f32_p1)(const ForwardCall<float, 1>&);
  void (*forward_f32_p2)(const ForwardCall<float, 2>&);
  void (*forward_f64_p1)(const ForwardCall<double, 1>&);
  void (*forward_f64_p2)(const ForwardCall<double, 2>&);
  void (*backward_f32_p1)(const BackwardCall<float, 1>&);
  void (*backward_f32_p2)(const BackwardCall<float, 2>&);
  void (*backward_f64_p1)(const BackwardCall<double, 1>&);
  void (*backward_f64_p2)(const BackwardCall<double, 2>&);
};

// Defined by each variant's translation unit.
namespace avx512 { extern const Variant variant; }
namespace avx2 { extern const Variant variant; }
namespace generic { extern const Variant variant; }

}  // namespace suncet::cpu
