// GroupNorm + SiLU on CUDA: input checks, allocation, and the launch of the ATen-free kernels of
// group_norm_cuda.cu on the current stream. Built into the separate library osp._C_cuda (setup.py,
// OSP_BUILD_CUDA), which registers CUDA implementations for the schemas osp._C declares; osp._C is
// loaded first.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../dispatch.h"

namespace osp {
namespace cuda {

int64_t group_norm_forward_workspace(int64_t N, int64_t C, int64_t S, int64_t G);
int64_t group_norm_backward_workspace(int64_t N, int64_t C, int64_t S);
void group_norm_forward(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S, int64_t G,
                        bool channels_last, float eps, const float* w, const float* b, bool silu, float* mean,
                        float* rstd, float* workspace, cudaStream_t stream);
void group_norm_backward(int dtype, const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t S,
                         int64_t G, bool channels_last, const float* mean, const float* rstd, const float* w,
                         const float* b, bool silu, float* dweight, float* dbias, float* workspace,
                         cudaStream_t stream);

namespace {

struct Dims {
  int64_t N, C, S, G;
  bool channels_last;
};

Dims check_inputs(const char* fn, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK(x.is_cuda(), fn, ": x is on ", x.device(), "; expected a CUDA tensor");
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, fn, ": x has shape ", x.sizes(), " (rank ", x.dim(),
              "); expected (N, C, *spatial) with 1 to 3 spatial dims");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), fn, ": x has dtype ", x.scalar_type(),
              "; expected Float, Half or BFloat16");
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, fn, ": channels C=", C, " are not divisible by num_groups=",
              num_groups);
  const bool cl = is_channels_last_dense(x);
  TORCH_CHECK(x.is_contiguous() || cl, fn, ": x with shape ", x.sizes(), " and strides ", x.strides(),
              " is neither contiguous nor dense channels-last; pass x.contiguous()");
  for (const auto& [name, p] : {std::make_pair("weight", &weight), std::make_pair("bias", &bias)}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = p->value();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, fn, ": ", name, " has shape ", t.sizes(), "; expected [", C, "]");
    TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, fn, ": ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type(), "; expected ", x.scalar_type(), " or Float");
  }
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  const int64_t N = x.size(0);
  TORCH_CHECK(N * num_groups <= 65535 && N * C <= 65535, fn, ": N*G=", N * num_groups, " and N*C=", N * C,
              " must fit a CUDA grid dimension (65535)");
  return {N, C, S, num_groups, cl};
}

int dtype_code(at::ScalarType t) {
  int code = 0;
  OSP_DISPATCH_FLOATS(t, "group_norm_cuda", [&] {
    code = std::is_same_v<scalar_t, float> ? 0 : std::is_same_v<scalar_t, at::Half> ? 1 : 2;
  });
  return code;
}

at::Tensor as_float(const std::optional<at::Tensor>& p) {
  return p.has_value() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

const float* opt_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, bool silu) {
  const Dims d = check_inputs("osp_C::group_norm_act", x, weight, bias, num_groups);
  TORCH_CHECK(eps > 0, "osp_C::group_norm_act: eps=", eps, "; expected a positive float");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({d.N, d.G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return {y, mean, rstd};
  }
  const at::Tensor w = as_float(weight), b = as_float(bias);
  at::Tensor ws = at::empty({group_norm_forward_workspace(d.N, d.C, d.S, d.G)}, x.options().dtype(at::kFloat));
  group_norm_forward(dtype_code(x.scalar_type()), x.const_data_ptr(), y.mutable_data_ptr(), d.N, d.C, d.S, d.G,
                     d.channels_last, static_cast<float>(eps), opt_ptr(w), opt_ptr(b), silu,
                     mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), ws.mutable_data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool compute_dx) {
  const char* fn = "osp_C::group_norm_act_backward";
  const Dims d = check_inputs(fn, x, weight, bias, num_groups);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type(), fn, ": dy has shape ",
              dy_in.sizes(), " and dtype ", dy_in.scalar_type(), "; expected x's shape ", x.sizes(), " and dtype ",
              x.scalar_type());
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == d.N && t->size(1) == d.G && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->device() == x.device(),
                fn, ": statistics have shape ", t->sizes(), " and dtype ", t->scalar_type(),
                "; expected contiguous Float [", d.N, ", ", d.G, "] on x's device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = dy_in.strides() == x.strides() ? dy_in : at::empty_like(x).copy_(dy_in);
  at::Tensor dx = compute_dx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dweight = at::empty({d.C}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty({d.C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const at::Tensor w = as_float(weight), b = as_float(bias);
  at::Tensor ws = at::empty({group_norm_backward_workspace(d.N, d.C, d.S)}, x.options().dtype(at::kFloat));
  group_norm_backward(dtype_code(x.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(),
                      compute_dx ? dx.mutable_data_ptr() : nullptr, d.N, d.C, d.S, d.G, d.channels_last,
                      mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), opt_ptr(w), opt_ptr(b), silu,
                      dweight.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>(), ws.mutable_data_ptr<float>(),
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace cuda
}  // namespace osp

TORCH_LIBRARY_IMPL(osp_C, CUDA, m) {
  m.impl("group_norm_act", &osp::cuda::group_norm_act_cuda);
  m.impl("group_norm_act_backward", &osp::cuda::group_norm_act_backward_cuda);
}
