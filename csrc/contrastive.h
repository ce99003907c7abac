// The fused multi-positive contrastive operation (see suncet/kernels/__init__.py for its meaning).
//
// Rows q [M, D] meet columns k [N, D] (both L2-normalised); every row carries P <= 2 positive
// keys (row_keys [M, P] against col_keys [N, P]) and a group (row_groups [M], col_groups [N]).
// Column j is allowed for row i when the groups match and j != i + self_offset; it is a
// positive of key set p when it is allowed and the p-th keys match. With s = q k^T / tau:
//   lse_all_i   = LSE over allowed j of s_ij
//   lse_pos_ip  = LSE over positive j of s_ij          (-inf when row i has no positive in p)
//   loss_ip     = lse_all_i - lse_pos_ip                (0 when lse_pos_ip is -inf)
// The forward returns {loss [M, P], valid [M, P] bool, lse_all [M], lse_pos [M, P]}, the
// statistics in fp32 (fp64 for fp64 inputs). The backward takes the upstream gradient of the
// losses and those statistics, recomputes the similarity tiles, and returns {dq, dk}; with
// one_tower (k is q) dq is the whole gradient and dk is empty.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace suncet {

// The instruction-set variant the CPU kernels run (contrastive_cpu.cpp), forcing one, and the
// variants of this build (those this processor supports, or all).
std::string cpu_variant();
void set_cpu_variant(const std::string& name);
std::vector<std::string> cpu_variants(bool supported_only);

std::vector<at::Tensor> multi_positive_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys,
                                                   const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                   const at::Tensor& col_groups, int64_t self_offset, double tau,
                                                   bool one_tower);

std::vector<at::Tensor> multi_positive_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& row_keys,
                                                    const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                    const at::Tensor& col_groups, const at::Tensor& lse_all,
                                                    const at::Tensor& lse_pos, int64_t self_offset, double tau,
                                                    bool one_tower);

#ifdef SUNCET_WITH_CUDA
std::vector<at::Tensor> multi_positive_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& row_keys, const at::Tensor& col_keys,
                                                    const at::Tensor& row_groups, const at::Tensor& col_groups,
                                                    int64_t self_offset, double tau, bool one_tower);

std::vector<at::Tensor> multi_positive_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& row_keys,
                                                     const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                     const at::Tensor& col_groups, const at::Tensor& lse_all,
                                                     const at::Tensor& lse_pos, int64_t self_offset, double tau,
                                                     bool one_tower);
#endif

}  // namespace suncet
