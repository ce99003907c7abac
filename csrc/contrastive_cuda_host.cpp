// Torch-side wrappers of the CUDA kernels: checks, output and workspace allocation on the
// caching allocator, the current stream. Compiled only with SUNCET_WITH_CUDA. Uses c10/cuda
// headers only (ATen/cuda/CUDAContext.h would pull in cusparse.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "contrastive.h"
#include "contrastive_cuda.h"

namespace suncet {
namespace {

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys, const at::Tensor& col_keys,
                       const at::Tensor& row_groups, const at::Tensor& col_groups, bool one_tower) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && q.device() == k.device(), "the cuda backend takes CUDA tensors on one device");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16,
              "the cuda backend takes bf16 inputs (use the triton backend for fp16/fp32)");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "q and k must be [rows, D] of the same D");
  TORCH_CHECK(q.size(1) <= cuda::kMaxDim, "the cuda backend supports D <= ", cuda::kMaxDim);
  TORCH_CHECK(!one_tower || q.size(0) == k.size(0), "one_tower needs k to be q");
  TORCH_CHECK(row_keys.dim() == 2 && col_keys.dim() == 2 && row_keys.size(1) == col_keys.size(1) &&
                  (row_keys.size(1) == 1 || row_keys.size(1) == 2),
              "keys must be [rows, P] and [cols, P] with P in {1, 2}");
  TORCH_CHECK(row_keys.size(0) == q.size(0) && col_keys.size(0) == k.size(0) && row_groups.numel() == q.size(0) &&
                  col_groups.numel() == k.size(0),
              "one key row and one group per row of q and of k");
  for (const at::Tensor* t : {&row_keys, &col_keys, &row_groups, &col_groups})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device() == q.device(), "keys and groups must be int64 on q's device");
}

cuda::Attributes attributes(const at::Tensor& rk, const at::Tensor& ck, const at::Tensor& rg, const at::Tensor& cg,
                            int64_t self_offset) {
  return cuda::Attributes{rk.data_ptr<int64_t>(), ck.data_ptr<int64_t>(), rg.data_ptr<int64_t>(), cg.data_ptr<int64_t>(),
                          rk.size(0), ck.size(0), static_cast<int>(rk.size(1)), self_offset};
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "suncet CUDA kernel failed: ", cudaGetErrorString(err)); }

// Whether q or k holds a NaN or an inf, as a 0-dim bool on the device (no host sync). The
// losses and gradients are then NaN, as on the other backends: the kernels' running maxima and
// masks could otherwise turn a non-finite input into a finite loss.
at::Tensor non_finite(const at::Tensor& q, const at::Tensor& k, bool one_tower) {
  const at::Tensor bad = at::isfinite(q).all().logical_not();
  return one_tower ? bad : bad.logical_or(at::isfinite(k).all().logical_not());
}

}  // namespace

std::vector<at::Tensor> multi_positive_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& row_keys, const at::Tensor& col_keys,
                                                    const at::Tensor& row_groups, const at::Tensor& col_groups,
                                                    int64_t self_offset, double tau, bool one_tower) {
  check_cuda_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  TORCH_CHECK(tau > 0, "tau must be positive");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = one_tower ? qc : k.contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  const int64_t m = q.size(0), n = k.size(0), sets = row_keys.size(1);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({m, sets}, f32), lse_all = at::empty({m}, f32), lse_pos = at::empty({m, sets}, f32);
  at::Tensor valid = at::empty({m, sets}, q.options().dtype(at::kBool));
  if (m == 0) return {loss, valid, lse_all, lse_pos};
  int device_sms = 0;
  check_launch(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int splits = cuda::forward_splits(m, n, device_sms);
  at::Tensor partial = at::empty({splits, 2 + 2 * sets, m}, f32);
  at::Tensor ranges = at::empty({2, std::max<int64_t>(1, (n + cuda::kTile - 1) / cuda::kTile)}, q.options().dtype(at::kLong));
  const cuda::ForwardArgs args{qc.data_ptr(), kc.data_ptr(), static_cast<int>(q.size(1)),
                               attributes(rk, ck, rg, cg, self_offset), static_cast<float>(tau), splits,
                               partial.data_ptr<float>(), ranges.data_ptr<int64_t>(), loss.data_ptr<float>(),
                               valid.data_ptr<bool>(), lse_all.data_ptr<float>(), lse_pos.data_ptr<float>()};
  check_launch(cuda::launch_forward(args, c10::cuda::getCurrentCUDAStream()));
  const at::Tensor bad = non_finite(qc, kc, one_tower);
  for (at::Tensor* t : {&loss, &lse_all, &lse_pos}) t->masked_fill_(bad, std::numeric_limits<float>::quiet_NaN());
  valid.masked_fill_(bad, false);
  return {loss, valid, lse_all, lse_pos};
}

std::vector<at::Tensor> multi_positive_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& row_keys,
                                                     const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                     const at::Tensor& col_groups, const at::Tensor& lse_all,
                                                     const at::Tensor& lse_pos, int64_t self_offset, double tau,
                                                     bool one_tower) {
  check_cuda_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t m = q.size(0), n = k.size(0), d = q.size(1), sets = row_keys.size(1);
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == m && grad_loss.size(1) == sets, "grad_loss must be [rows, P]");
  const at::Tensor g = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor la = lse_all.to(at::kFloat).contiguous(), lp = lse_pos.to(at::kFloat).contiguous();
  const at::Tensor qc = q.contiguous(), kc = one_tower ? qc : k.contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  at::Tensor dq = at::empty_like(qc);
  at::Tensor dk = one_tower ? at::empty({0, d}, q.options()) : at::empty_like(kc);
  if (m == 0) return {dq.zero_(), dk.zero_()};
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor tables = at::empty({2 * (int64_t{1} << sets), m}, f32);
  const int64_t span = std::max<int64_t>(1, (std::max(m, n) + cuda::kTile - 1) / cuda::kTile);
  at::Tensor ranges = at::empty({4, span}, q.options().dtype(at::kLong));
  const cuda::BackwardArgs args{g.data_ptr<float>(), la.data_ptr<float>(), lp.data_ptr<float>(), tables.data_ptr<float>(),
                                ranges.data_ptr<int64_t>(), qc.data_ptr(), kc.data_ptr(), dq.data_ptr(),
                                one_tower ? nullptr : dk.data_ptr(), static_cast<int>(d), one_tower,
                                attributes(rk, ck, rg, cg, self_offset), static_cast<float>(tau)};
  check_launch(cuda::launch_backward(args, c10::cuda::getCurrentCUDAStream()));
  const at::Tensor bad = non_finite(qc, kc, one_tower);
  dq.masked_fill_(bad, std::numeric_limits<float>::quiet_NaN());
  if (!one_tower) dk.masked_fill_(bad, std::numeric_limits<float>::quiet_NaN());
  return {dq, dk};
}

}  // namespace suncet
