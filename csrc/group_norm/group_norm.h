// GroupNorm with a fused SiLU: the CPU host functions (group_norm_cpu.cpp) and the per-ISA
// kernels they call (group_norm_cpu_kernel.cpp, compiled once per level).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "../cpu_isa.h"

namespace osp {

// x: (N, C, *spatial), 1 to 3 spatial dims, dense channel-first or dense channels-last.
// Returns y (x's strides), mean and rstd (N, G) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu);

// Gradients: dx (x's strides; empty when !compute_dx), dweight and dbias (C,) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, bool silu, bool compute_dx);

// In place, for inference: x <- act(group_norm(x)).
void group_norm_act_inplace_cpu(
    at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu);

}  // namespace osp

// Kernels. x (and dy, y, dx) share one dense layout: channels_last means (N, S, C) in memory,
// else (N, C, S). weight/bias are float32 (C,) or undefined; mean/rstd float32 (N, G).
DECLARE_ISA_FN(void, group_norm_stats_kernel, const at::Tensor& x, int64_t N, int64_t C, int64_t S,
               int64_t G, bool channels_last, double eps, at::Tensor& mean, at::Tensor& rstd)
DECLARE_ISA_FN(void, group_norm_apply_kernel, const at::Tensor& x, int64_t N, int64_t C, int64_t S,
               int64_t G, bool channels_last, const at::Tensor& mean, const at::Tensor& rstd,
               const at::Tensor& weight, const at::Tensor& bias, bool silu, at::Tensor& y)
DECLARE_ISA_FN(void, group_norm_backward_kernel, const at::Tensor& dy, const at::Tensor& x, int64_t N,
               int64_t C, int64_t S, int64_t G, bool channels_last, const at::Tensor& mean,
               const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias, bool silu,
               bool compute_dx, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias)
