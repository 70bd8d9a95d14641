// Tiled decoding's accumulation on CPU: blend_tile_ (out[region] += tile * ramp weights,
// wsum[region] += weights) and blend_normalize_ (out /= wsum), both in place.
#pragma once

#include <ATen/core/Tensor.h>

#include "../cpu_isa.h"

namespace osp {

void blend_tile_cpu(at::Tensor& out, at::Tensor& wsum, const at::Tensor& tile, at::IntArrayRef offset,
                    at::IntArrayRef overlap_lo, at::IntArrayRef overlap_hi);
void blend_normalize_cpu(at::Tensor& out, const at::Tensor& wsum);

}  // namespace osp

// out (B, C, T, H, W) and tile (B, C, t, h, w) contiguous; wsum (T, H, W) float32 contiguous;
// ramps: float32 weights along t, h, w of the tile.
DECLARE_ISA_FN(void, blend_tile_kernel, at::Tensor& out, at::Tensor& wsum, const at::Tensor& tile,
               const int64_t* offset, const float* rt, const float* rh, const float* rw)
DECLARE_ISA_FN(void, blend_normalize_kernel, at::Tensor& out, const at::Tensor& wsum)
