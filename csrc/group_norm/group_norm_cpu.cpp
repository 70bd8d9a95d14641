// GroupNorm + SiLU on CPU: input checks, allocation, and the call into the active ISA level's kernels.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include "../dispatch.h"
#include "group_norm.h"

namespace osp {
namespace {

struct Dims {
  int64_t N, C, S, G;
  bool channels_last;
};

Dims check_inputs(const char* fn, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": x is on ", x.device(), "; expected a CPU tensor");
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, fn, ": x has shape ", x.sizes(), " (rank ", x.dim(),
              "); expected (N, C, *spatial) with 1 to 3 spatial dims");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), fn, ": x has dtype ", x.scalar_type(),
              "; expected Float, Half or BFloat16");
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, fn, ": channels C=", C,
              " are not divisible by num_groups=", num_groups);
  const bool cl = is_channels_last_dense(x);
  TORCH_CHECK(x.is_contiguous() || cl, fn, ": x with shape ", x.sizes(), " and strides ", x.strides(),
              " is neither contiguous nor dense channels-last; pass x.contiguous()");
  for (const auto& [name, p] : {std::make_pair("weight", &weight), std::make_pair("bias", &bias)}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = p->value();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, fn, ": ", name, " has shape ", t.sizes(), "; expected [", C,
                "] for C=", C, " channels");
    TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " is on ", t.device(), "; expected a CPU tensor");
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, fn, ": ", name,
                " has dtype ", t.scalar_type(), " but x has ", x.scalar_type(), "; expected ", x.scalar_type(),
                " or Float");
  }
  int64_t S = 1;
  for (const auto d : c10::irange(2, x.dim())) S *= x.size(d);
  return {x.size(0), C, S, num_groups, cl};
}

at::Tensor as_float(const std::optional<at::Tensor>& p) {
  return p.has_value() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

void check_stats(const char* fn, const at::Tensor& t, const char* name, const Dims& d) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d.N && t.size(1) == d.G && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              fn, ": ", name, " has shape ", t.sizes(), " and dtype ", t.scalar_type(), "; expected a contiguous [",
              d.N, ", ", d.G, "] Float tensor");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu) {
  const Dims d = check_inputs("osp_C::group_norm_act", x, weight, bias, num_groups);
  TORCH_CHECK(eps > 0, "osp_C::group_norm_act: eps=", eps, "; expected a positive float");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  poisoned(y), poisoned(mean), poisoned(rstd);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return {y, mean, rstd};
  }
  const at::Tensor w = as_float(weight), b = as_float(bias);
  ISA_CALL(group_norm_stats_kernel, x, d.N, d.C, d.S, d.G, d.channels_last, eps, mean, rstd);
  ISA_CALL(group_norm_apply_kernel, x, d.N, d.C, d.S, d.G, d.channels_last, mean, rstd, w, b, silu, y);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool compute_dx) {
  const char* fn = "osp_C::group_norm_act_backward";
  const Dims d = check_inputs(fn, x, weight, bias, num_groups);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type(), fn, ": dy has shape ",
              dy_in.sizes(), " and dtype ", dy_in.scalar_type(), "; expected x's shape ", x.sizes(), " and dtype ",
              x.scalar_type());
  check_stats(fn, mean, "mean", d);
  check_stats(fn, rstd, "rstd", d);
  // dy in x's memory layout, so that one offset indexes both.
  const at::Tensor dy = dy_in.strides() == x.strides() ? dy_in : at::empty_like(x).copy_(dy_in);
  at::Tensor dx = compute_dx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dweight = at::empty({d.C}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty({d.C}, x.options().dtype(at::kFloat));
  poisoned(dx), poisoned(dweight), poisoned(dbias);
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const at::Tensor w = as_float(weight), b = as_float(bias);
  ISA_CALL(group_norm_backward_kernel, dy, x, d.N, d.C, d.S, d.G, d.channels_last, mean, rstd, w, b, silu,
           compute_dx, dx, dweight, dbias);
  return {dx, dweight, dbias};
}

void group_norm_act_inplace_cpu(at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool silu) {
  const Dims d = check_inputs("osp_C::group_norm_act_", x, weight, bias, num_groups);
  TORCH_CHECK(eps > 0, "osp_C::group_norm_act_: eps=", eps, "; expected a positive float");
  if (x.numel() == 0) return;
  at::Tensor mean = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  const at::Tensor w = as_float(weight), b = as_float(bias);
  ISA_CALL(group_norm_stats_kernel, x, d.N, d.C, d.S, d.G, d.channels_last, eps, mean, rstd);
  ISA_CALL(group_norm_apply_kernel, x, d.N, d.C, d.S, d.G, d.channels_last, mean, rstd, w, b, silu, x);
}

}  // namespace osp
