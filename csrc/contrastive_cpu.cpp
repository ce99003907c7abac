// The CPU entry points of the fused multi-positive contrastive loss: input checks, the lane
// integers of keys and groups, the backward's per-row gradient tables, and the choice of the
// instruction-set variant that runs the kernels (contrastive_cpu_kernels.cpp).
//
// The variant is chosen at run time from what the processor supports, best first (avx512,
// avx2, generic), as PyTorch chooses its own CPU kernels; SUNCET_CPU_VARIANT or
// set_cpu_variant forces one that the processor supports. This file is built for the
// baseline of the target architecture, so the extension loads on any machine of it.
#include "contrastive.h"
#include "contrastive_cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace suncet {
namespace {

using cpu::Variant;

// Compiled variants, best first.
const Variant* const kCompiled[] = {
#ifdef SUNCET_CPU_HAS_AVX512
    &cpu::avx512::variant,
#endif
#ifdef SUNCET_CPU_HAS_AVX2
    &cpu::avx2::variant,
#endif
    &cpu::generic::variant,
};

bool processor_supports(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "generic";
}

std::string names_of(bool supported_only) {
  std::string out;
  for (const Variant* v : kCompiled) {
    if (supported_only && !processor_supports(v->name)) continue;
    out += out.empty() ? "" : ", ";
    out += v->name;
  }
  return out;
}

const Variant* find_variant(const std::string& name) {
  for (const Variant* v : kCompiled)
    if (name == v->name) {
      TORCH_CHECK(processor_supports(name), "CPU kernel variant '", name,
                  "' needs instructions this processor lacks; it runs: ", names_of(true));
      return v;
    }
  TORCH_CHECK(false, "unknown CPU kernel variant '", name, "'; this build has: ", names_of(false));
  return nullptr;
}

std::atomic<const Variant*> active{nullptr};
std::mutex choosing;

const Variant& chosen_variant() {
  const Variant* v = active.load(std::memory_order_acquire);
  if (v) return *v;
  std::lock_guard<std::mutex> lock(choosing);
  v = active.load(std::memory_order_relaxed);
  if (v) return *v;
  const char* forced = std::getenv("SUNCET_CPU_VARIANT");
  if (forced && *forced) {
    v = find_variant(forced);  // throws (and chooses nothing) when the variable names no usable variant
  } else {
    for (const Variant* candidate : kCompiled)
      if (processor_supports(candidate->name)) {
        v = candidate;
        break;
      }
  }
  active.store(v, std::memory_order_release);
  return *v;
}

// Equality-preserving maps of int64 keys to lane integers (int32 beside fp32): a row attribute
// and its column counterpart are mapped together, so equal values stay equal.
template <typename Id>
void equality_ids(const int64_t* a, int64_t a_stride, int64_t na, const int64_t* b, int64_t b_stride, int64_t nb,
                  Id* out_a, Id* out_b) {
  if constexpr (sizeof(Id) == sizeof(int64_t)) {
    for (int64_t i = 0; i < na; ++i) out_a[i] = a[i * a_stride];
    for (int64_t i = 0; i < nb; ++i) out_b[i] = b[i * b_stride];
  } else {
    int64_t lo = std::numeric_limits<int64_t>::max();
    int64_t hi = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < na; ++i) lo = std::min(lo, a[i * a_stride]), hi = std::max(hi, a[i * a_stride]);
    for (int64_t i = 0; i < nb; ++i) lo = std::min(lo, b[i * b_stride]), hi = std::max(hi, b[i * b_stride]);
    if (lo >= std::numeric_limits<Id>::min() && hi <= std::numeric_limits<Id>::max()) {
      for (int64_t i = 0; i < na; ++i) out_a[i] = static_cast<Id>(a[i * a_stride]);
      for (int64_t i = 0; i < nb; ++i) out_b[i] = static_cast<Id>(b[i * b_stride]);
      return;
    }
    std::unordered_map<int64_t, Id> ids;
    auto id_of = [&](int64_t v) { return ids.emplace(v, static_cast<Id>(ids.size())).first->second; };
    for (int64_t i = 0; i < na; ++i) out_a[i] = id_of(a[i * a_stride]);
    for (int64_t i = 0; i < nb; ++i) out_b[i] = id_of(b[i * b_stride]);
  }
}

// Keys and groups of both sides as lane integers, each padded with cpu::kAttributePad zeros.
template <typename T, int P>
struct LaneAttributes {
  using Id = cpu::LaneId<T>;
  std::vector<Id> row_key[P], col_key[P], row_group, col_group;
  cpu::Layout<T, P> layout;

  LaneAttributes(const at::Tensor& row_keys, const at::Tensor& col_keys, const at::Tensor& row_groups,
                 const at::Tensor& col_groups, int64_t self_offset) {
    const int64_t rows = row_keys.size(0), cols = col_keys.size(0);
    for (int p = 0; p < P; ++p) {
      row_key[p].assign(rows + cpu::kAttributePad, 0);
      col_key[p].assign(cols + cpu::kAttributePad, 0);
      equality_ids(row_keys.data_ptr<int64_t>() + p, P, rows, col_keys.data_ptr<int64_t>() + p, P, cols,
                   row_key[p].data(), col_key[p].data());
      layout.row_key[p] = row_key[p].data();
      layout.col_key[p] = col_key[p].data();
    }
    row_group.assign(rows + cpu::kAttributePad, 0);
    col_group.assign(cols + cpu::kAttributePad, 0);
    equality_ids(row_groups.data_ptr<int64_t>(), 1, rows, col_groups.data_ptr<int64_t>(), 1, cols, row_group.data(),
                 col_group.data());
    layout.row_group = row_group.data();
    layout.col_group = col_group.data();
    layout.rows = rows;
    layout.cols = cols;
    layout.self_offset = self_offset;
  }
};

// The gradient of the losses with respect to s_ij is
//   G_ij = sum_p g_ip (pA_ij - [j in P_p(i)] pP_ij),  pA = exp(s - lse_all), pP_p = exp(s - lse_pos_p).
// For an entry of membership code c, G_ij = coef_c(i) * exp2(s2_ij - offset_c(i)), offset_c the
// smallest LSE among the entry's sets (so that the exponential is <= 1) in log2 units, coef_c the
// matching combination of g and LSE differences. Rows without any valid set keep a dead offset
// and a zero coefficient.
template <typename T, int P>
struct GradientTableData {
  static constexpr int codes = 1 << P;
  std::vector<T> offset[codes], coef[codes];
  cpu::GradientTables<T, P> tables;

  GradientTableData(const T* grad, const T* lse_all, const T* lse_pos, int64_t m) {
    for (int c = 0; c < codes; ++c) {
      offset[c].assign(m + cpu::kAttributePad, cpu::kDeadOffset<T>);
      coef[c].assign(m + cpu::kAttributePad, T(0));
      tables.offset[c] = offset[c].data();
      tables.coef[c] = coef[c].data();
    }
    constexpr double log2e = 1.4426950408889634;
    for (int64_t i = 0; i < m; ++i) {
      const double all2 = static_cast<double>(lse_all[i]) * log2e;
      double pos2[P], g[P], g_sum = 0;
      bool ok[P], any = false;
      for (int p = 0; p < P; ++p) {
        ok[p] = std::isfinite(static_cast<double>(lse_pos[i * P + p]));
        pos2[p] = ok[p] ? static_cast<double>(lse_pos[i * P + p]) * log2e : 0.0;
        g[p] = ok[p] ? static_cast<double>(grad[i * P + p]) : 0.0;
        g_sum += g[p];
        any = any || ok[p];
      }
      if (!any) continue;
      for (int c = 0; c < codes; ++c) {
        bool reachable = true;
        double o = all2;
        for (int p = 0; p < P; ++p)
          if (c >> p & 1) reachable = reachable && ok[p], o = std::min(o, pos2[p]);
        if (!reachable) continue;
        double k = g_sum * std::exp2(o - all2);
        for (int p = 0; p < P; ++p)
          if (c >> p & 1) k -= g[p] * std::exp2(o - pos2[p]);
        offset[c][i] = static_cast<T>(o);
        coef[c][i] = static_cast<T>(k);
      }
    }
  }
};

template <typename T, int P>
void run_forward(const Variant& v, const cpu::ForwardCall<T, P>& call) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (P == 1) v.forward_f32_p1(call); else v.forward_f32_p2(call);
  } else {
    if constexpr (P == 1) v.forward_f64_p1(call); else v.forward_f64_p2(call);
  }
}

template <typename T, int P>
void run_backward(const Variant& v, const cpu::BackwardCall<T, P>& call) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (P == 1) v.backward_f32_p1(call); else v.backward_f32_p2(call);
  } else {
    if constexpr (P == 1) v.backward_f64_p1(call); else v.backward_f64_p2(call);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys, const at::Tensor& col_keys,
                  const at::Tensor& row_groups, const at::Tensor& col_groups, bool one_tower) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "q and k must be [rows, D] of the same D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "the cpu backend takes CPU tensors");
  TORCH_CHECK(!one_tower || q.size(0) == k.size(0), "one_tower needs k to be q");
  TORCH_CHECK(row_keys.dim() == 2 && col_keys.dim() == 2 && row_keys.size(1) == col_keys.size(1),
              "keys must be [rows, P] and [cols, P]");
  TORCH_CHECK(row_keys.size(1) == 1 || row_keys.size(1) == 2, "1 or 2 positive-key sets are supported");
  TORCH_CHECK(row_keys.size(0) == q.size(0) && col_keys.size(0) == k.size(0), "one key row per row of q and of k");
  TORCH_CHECK(row_groups.dim() == 1 && row_groups.size(0) == q.size(0) && col_groups.dim() == 1 &&
                  col_groups.size(0) == k.size(0),
              "one group per row of q and of k");
  for (const at::Tensor* t : {&row_keys, &col_keys, &row_groups, &col_groups})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device().is_cpu(), "keys and groups must be int64 CPU tensors");
}

// The kernels run in fp32 (fp64 for fp64 inputs): half-precision inputs are widened first.
at::ScalarType accumulation_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

template <typename F>
void dispatch(at::ScalarType accumulation, int64_t p, F&& f) {
  auto with_p = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p == 1)
      f(T{}, std::integral_constant<int, 1>{});
    else
      f(T{}, std::integral_constant<int, 2>{});
  };
  if (accumulation == at::kDouble)
    with_p(std::type_identity<double>{});
  else
    with_p(std::type_identity<float>{});
}

}  // namespace

std::string cpu_variant() { return chosen_variant().name; }

void set_cpu_variant(const std::string& name) {
  const Variant* v = find_variant(name);
  std::lock_guard<std::mutex> lock(choosing);
  active.store(v, std::memory_order_release);
}

std::vector<std::string> cpu_variants(bool supported_only) {
  std::vector<std::string> out;
  for (const Variant* v : kCompiled)
    if (!supported_only || processor_supports(v->name)) out.emplace_back(v->name);
  return out;
}

std::vector<at::Tensor> multi_positive_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys,
                                                   const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                   const at::Tensor& col_groups, int64_t self_offset, double tau,
                                                   bool one_tower) {
  check_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  TORCH_CHECK(tau > 0, "tau must be positive");
  const cpu::Variant& variant = chosen_variant();
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  const at::Tensor qc = q.to(acc).contiguous();
  const at::Tensor kc = one_tower ? qc : k.to(acc).contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  const int64_t m = q.size(0), p_sets = row_keys.size(1);
  const auto st = q.options().dtype(acc);
  at::Tensor loss = at::empty({m, p_sets}, st), lse_all = at::empty({m}, st), lse_pos = at::empty({m, p_sets}, st);
  at::Tensor valid = at::empty({m, p_sets}, q.options().dtype(at::kBool));
  dispatch(acc, p_sets, [&](auto t, auto pc) {
    using T = decltype(t);
    constexpr int P = decltype(pc)::value;
    const LaneAttributes<T, P> attrs(rk, ck, rg, cg, self_offset);
    const cpu::ForwardCall<T, P> call{qc.data_ptr<T>(), kc.data_ptr<T>(), q.size(1), attrs.layout, tau,
                                      at::get_num_threads(), loss.data_ptr<T>(), valid.data_ptr<bool>(),
                                      lse_all.data_ptr<T>(), lse_pos.data_ptr<T>()};
    run_forward(variant, call);
  });
  return {loss, valid, lse_all, lse_pos};
}

std::vector<at::Tensor> multi_positive_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& row_keys,
                                                    const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                    const at::Tensor& col_groups, const at::Tensor& lse_all,
                                                    const at::Tensor& lse_pos, int64_t self_offset, double tau,
                                                    bool one_tower) {
  check_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  const int64_t m = q.size(0), n = k.size(0), d = q.size(1), p_sets = row_keys.size(1);
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == m && grad_loss.size(1) == p_sets,
              "grad_loss must be [rows, P]");
  TORCH_CHECK(lse_all.numel() == m && lse_pos.numel() == m * p_sets, "statistics do not match q");
  const cpu::Variant& variant = chosen_variant();
  const at::ScalarType acc = accumulation_type(q.scalar_type());
  const at::Tensor g = grad_loss.to(acc).contiguous(), la = lse_all.to(acc).contiguous(), lp = lse_pos.to(acc).contiguous();
  const at::Tensor qc = q.to(acc).contiguous();
  const at::Tensor kc = one_tower ? qc : k.to(acc).contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  at::Tensor dq = at::empty({m, d}, q.options().dtype(acc));
  at::Tensor dk = one_tower ? at::empty({0, d}, q.options().dtype(acc)) : at::empty({n, d}, q.options().dtype(acc));
  dispatch(acc, p_sets, [&](auto t, auto pc) {
    using T = decltype(t);
    constexpr int P = decltype(pc)::value;
    const LaneAttributes<T, P> attrs(rk, ck, rg, cg, self_offset);
    const GradientTableData<T, P> tables(g.data_ptr<T>(), la.data_ptr<T>(), lp.data_ptr<T>(), m);
    const cpu::BackwardCall<T, P> call{qc.data_ptr<T>(), kc.data_ptr<T>(), d, attrs.layout, tables.tables, tau,
                                       at::get_num_threads(), one_tower, dq.data_ptr<T>(), dk.data_ptr<T>()};
    run_backward(variant, call);
  });
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type())};
}

}  // namespace suncet
