// The DiT's per-token adaLN op on CPU: layer_norm_modulate(x, shift, scale) =
// LayerNorm(x, no affine) * (1 + scale) + shift over the last dim of (B, L, D) tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../cpu_isa.h"

namespace osp {

// x (B, L, D) contiguous; shift, scale (Bm, D) with Bm in {1, B} (each its own), x's dtype or Float.
// Returns y (B, L, D) in x's dtype, mean and rstd (B, L) Float.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                       const at::Tensor& scale, double eps);
// Returns dx (B, L, D) in x's dtype, dshift and dscale (B, D) Float (per batch entry).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd);

// gated_residual: out = x + gate * y; x, y (B, L, D) contiguous in one dtype, gate (Bg, D), Bg in {1, B}, same dtype.
at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y);
// Returns dy (B, L, D) in y's dtype and dgate (B, D) Float per batch entry (dx is dout itself).
std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& dout, const at::Tensor& gate,
                                                               const at::Tensor& y);

}  // namespace osp

// shift_f, scale_f: (Bm, D) Float contiguous.
DECLARE_ISA_FN(void, layer_norm_modulate_kernel, const at::Tensor& x, const at::Tensor& shift_f,
               const at::Tensor& scale_f, double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd)
DECLARE_ISA_FN(void, layer_norm_modulate_backward_kernel, const at::Tensor& dy, const at::Tensor& x,
               const at::Tensor& scale_f, const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
               at::Tensor& dshift, at::Tensor& dscale)
DECLARE_ISA_FN(void, gated_residual_kernel, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
               at::Tensor& out)
DECLARE_ISA_FN(void, gated_residual_backward_kernel, const at::Tensor& dout, const at::Tensor& gate,
               const at::Tensor& y, at::Tensor& dy, at::Tensor& dgate)
