// Dtype dispatch and input checks shared by the osp._C host functions.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <limits>

// The dtypes of the osp kernels: float32, float16, bfloat16 (statistics and accumulation in fp32).
// Defines scalar_t inside the body, as AT_DISPATCH_FLOATING_TYPES does.
#define OSP_DISPATCH_FLOATS(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace osp {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Dense channel-first: x.is_contiguous(). Dense channels-last: (N, *spatial, C) in memory, for any
// number of spatial dims (channels_last for 4-D, channels_last_3d for 5-D, (N, L, C) for 3-D).
inline bool is_channels_last_dense(const at::Tensor& x) {
  return !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// Tests set this (osp_C::set_poison_outputs) so that every output a host function allocates starts
// as NaN: an element a kernel forgets to write then fails the parity check instead of passing by luck.
bool& poison_outputs();

inline at::Tensor& poisoned(at::Tensor& t) {
  if (poison_outputs() && t.is_floating_point() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace osp
