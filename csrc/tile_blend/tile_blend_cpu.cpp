// Tile blending on CPU: input checks and the call into the active ISA level's kernels.
#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "tile_blend.h"

namespace osp {
namespace {

std::vector<float> ramp(int64_t n, int64_t lo, int64_t hi) {
  // r(i) = min(1, (i + 1) / (lo + 1), (n - i) / (hi + 1)) in fp32, as osp.ops.tile_blend.ramp.
  std::vector<float> r(n);
  for (int64_t i = 0; i < n; ++i) {
    const float up = static_cast<float>(i + 1) / static_cast<float>(lo + 1);
    const float down = static_cast<float>(n - i) / static_cast<float>(hi + 1);
    r[i] = std::min(std::min(up, down), 1.f);
  }
  return r;
}

}  // namespace

void blend_tile_cpu(at::Tensor& out, at::Tensor& wsum, const at::Tensor& tile_in, at::IntArrayRef offset,
                    at::IntArrayRef overlap_lo, at::IntArrayRef overlap_hi) {
  const char* fn = "osp_C::blend_tile_";
  TORCH_CHECK(out.dim() == 5 && tile_in.dim() == 5 && wsum.dim() == 3, fn, ": out ", out.sizes(), ", tile ",
              tile_in.sizes(), ", wsum ", wsum.sizes(), "; expected out (B, C, T, H, W), tile (B, C, t, h, w), "
              "wsum (T, H, W)");
  TORCH_CHECK(out.device().is_cpu() && tile_in.device().is_cpu() && wsum.device().is_cpu(), fn,
              ": expected CPU tensors");
  TORCH_CHECK(is_kernel_dtype(out.scalar_type()) && is_kernel_dtype(tile_in.scalar_type()), fn, ": out has dtype ",
              out.scalar_type(), " and tile ", tile_in.scalar_type(), "; expected Float, Half or BFloat16");
  TORCH_CHECK(out.is_contiguous(), fn, ": out with strides ", out.strides(), " is not contiguous");
  TORCH_CHECK(wsum.scalar_type() == at::kFloat && wsum.is_contiguous() && wsum.sizes() == out.sizes().slice(2), fn,
              ": wsum is ", wsum.sizes(), " ", wsum.scalar_type(), "; expected a contiguous Float ", out.sizes().slice(2));
  TORCH_CHECK(tile_in.size(0) == out.size(0) && tile_in.size(1) == out.size(1), fn, ": tile ", tile_in.sizes(),
              " does not match out ", out.sizes(), " in (B, C)");
  TORCH_CHECK(offset.size() == 3 && overlap_lo.size() == 3 && overlap_hi.size() == 3, fn,
              ": offset, overlap_lo and overlap_hi must have 3 entries (t, h, w)");
  for (int d = 0; d < 3; ++d) {
    const int64_t n = tile_in.size(2 + d);
    TORCH_CHECK(offset[d] >= 0 && offset[d] + n <= out.size(2 + d), fn, ": tile ", tile_in.sizes().slice(2),
                " at offset ", offset, " overruns out's ", out.sizes().slice(2), " along axis ", "THW"[d]);
    TORCH_CHECK(overlap_lo[d] >= 0 && overlap_hi[d] >= 0 && overlap_lo[d] + overlap_hi[d] <= n, fn, ": overlaps ",
                overlap_lo[d], " + ", overlap_hi[d], " exceed the tile's length ", n, " along ", "THW"[d]);
  }
  if (tile_in.numel() == 0) return;
  const at::Tensor tile = tile_in.contiguous();  // a strided tile is copied once
  const std::vector<float> rt = ramp(tile.size(2), overlap_lo[0], overlap_hi[0]);
  const std::vector<float> rh = ramp(tile.size(3), overlap_lo[1], overlap_hi[1]);
  const std::vector<float> rw = ramp(tile.size(4), overlap_lo[2], overlap_hi[2]);
  const int64_t off[3] = {offset[0], offset[1], offset[2]};
  ISA_CALL(blend_tile_kernel, out, wsum, tile, off, rt.data(), rh.data(), rw.data());
}

void blend_normalize_cpu(at::Tensor& out, const at::Tensor& wsum) {
  const char* fn = "osp_C::blend_normalize_";
  TORCH_CHECK(out.dim() == 5 && out.is_contiguous() && is_kernel_dtype(out.scalar_type()) && out.device().is_cpu(),
              fn, ": out is ", out.sizes(), " ", out.scalar_type(), " with strides ", out.strides(),
              "; expected a contiguous (B, C, T, H, W) Float, Half or BFloat16 CPU tensor");
  TORCH_CHECK(wsum.scalar_type() == at::kFloat && wsum.is_contiguous() && wsum.sizes() == out.sizes().slice(2), fn,
              ": wsum is ", wsum.sizes(), " ", wsum.scalar_type(), "; expected a contiguous Float ", out.sizes().slice(2));
  if (out.numel() == 0) return;
  ISA_CALL(blend_normalize_kernel, out, wsum);
}

}  // namespace osp
