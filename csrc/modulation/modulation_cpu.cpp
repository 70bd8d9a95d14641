// layer_norm_modulate on CPU: input checks, allocation, and the call into the active ISA level's kernels.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "../dispatch.h"
#include "modulation.h"

namespace osp {
namespace {

void check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), fn, ": x has shape ", x.sizes(), " on ", x.device(),
              "; expected a (B, L, D) CPU tensor");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), fn, ": x has dtype ", x.scalar_type(),
              "; expected Float, Half or BFloat16");
  TORCH_CHECK(x.is_contiguous(), fn, ": x with strides ", x.strides(), " is not contiguous; pass x.contiguous()");
}

at::Tensor rows_f(const char* fn, const char* name, const at::Tensor& m, const at::Tensor& x) {
  const int64_t B = x.size(0), D = x.size(2);
  TORCH_CHECK(m.dim() == 2 && m.size(1) == D && (m.size(0) == 1 || m.size(0) == B) && m.device().is_cpu(), fn, ": ",
              name, " has shape ", m.sizes(), "; expected [", B, ", ", D, "] or [1, ", D, "] on the CPU");
  TORCH_CHECK(m.scalar_type() == x.scalar_type() || m.scalar_type() == at::kFloat, fn, ": ", name, " has dtype ",
              m.scalar_type(), " but x has ", x.scalar_type(), "; expected ", x.scalar_type(), " or Float");
  return m.to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                       const at::Tensor& scale, double eps) {
  const char* fn = "osp_C::layer_norm_modulate";
  check_x(fn, x);
  TORCH_CHECK(eps > 0, fn, ": eps=", eps, "; expected a positive float");
  const at::Tensor sh = rows_f(fn, "shift", shift, x), sc = rows_f(fn, "scale", scale, x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  poisoned(y), poisoned(mean), poisoned(rstd);
  if (x.numel() > 0) ISA_CALL(layer_norm_modulate_kernel, x, sh, sc, eps, y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd) {
  const char* fn = "osp_C::layer_norm_modulate_backward";
  check_x(fn, x);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type(), fn, ": dy has shape ",
              dy_in.sizes(), " and dtype ", dy_in.scalar_type(), "; expected x's shape ", x.sizes(), " and dtype ",
              x.scalar_type());
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(1) &&
                    t->scalar_type() == at::kFloat && t->is_contiguous(),
                fn, ": statistics have shape ", t->sizes(), " and dtype ", t->scalar_type(),
                "; expected contiguous Float [", x.size(0), ", ", x.size(1), "]");
  }
  const at::Tensor sc = rows_f(fn, "scale", scale, x);
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dshift = at::empty({x.size(0), x.size(2)}, x.options().dtype(at::kFloat));
  at::Tensor dscale = at::empty({x.size(0), x.size(2)}, x.options().dtype(at::kFloat));
  poisoned(dx), poisoned(dshift), poisoned(dscale);
  if (x.numel() == 0) {
    dshift.zero_();
    dscale.zero_();
    return {dx, dshift, dscale};
  }
  ISA_CALL(layer_norm_modulate_backward_kernel, dy, x, sc, mean, rstd, dx, dshift, dscale);
  return {dx, dshift, dscale};
}

at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  const char* fn = "osp_C::gated_residual";
  check_x(fn, x);
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous(), fn, ": y is ",
              y.sizes(), " ", y.scalar_type(), " with strides ", y.strides(), "; expected a contiguous ", x.sizes(), " ",
              x.scalar_type(), " (x's shape and dtype)");
  TORCH_CHECK(gate.dim() == 2 && gate.size(1) == x.size(2) && (gate.size(0) == 1 || gate.size(0) == x.size(0)) &&
                  gate.scalar_type() == x.scalar_type() && gate.is_contiguous(),
              fn, ": gate is ", gate.sizes(), " ", gate.scalar_type(), "; expected a contiguous [", x.size(0), ", ",
              x.size(2), "] or [1, ", x.size(2), "] ", x.scalar_type(), " tensor");
  at::Tensor out = at::empty_like(x);
  poisoned(out);
  if (x.numel() > 0) ISA_CALL(gated_residual_kernel, x, gate, y, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& dout_in, const at::Tensor& gate,
                                                               const at::Tensor& y) {
  const char* fn = "osp_C::gated_residual_backward";
  check_x(fn, y);
  TORCH_CHECK(dout_in.sizes() == y.sizes() && dout_in.scalar_type() == y.scalar_type(), fn, ": dout is ",
              dout_in.sizes(), " ", dout_in.scalar_type(), "; expected y's ", y.sizes(), " ", y.scalar_type());
  TORCH_CHECK(gate.dim() == 2 && gate.size(1) == y.size(2) && (gate.size(0) == 1 || gate.size(0) == y.size(0)) &&
                  gate.scalar_type() == y.scalar_type() && gate.is_contiguous(),
              fn, ": gate is ", gate.sizes(), " ", gate.scalar_type(), "; expected a contiguous [", y.size(0), ", ",
              y.size(2), "] or [1, ", y.size(2), "] ", y.scalar_type(), " tensor");
  const at::Tensor dout = dout_in.contiguous();
  at::Tensor dy = at::empty_like(y);
  at::Tensor dgate = at::empty({y.size(0), y.size(2)}, y.options().dtype(at::kFloat));
  poisoned(dy), poisoned(dgate);
  if (y.numel() == 0) {
    dgate.zero_();
    return {dy, dgate};
  }
  ISA_CALL(gated_residual_backward_kernel, dout, gate, y, dy, dgate);
  return {dy, dgate};
}

}  // namespace osp
