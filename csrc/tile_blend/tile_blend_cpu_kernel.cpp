// Tile blending CPU kernels, compiled once per ISA level. Every output row of a tile is one
// vectorized pass (read tile and out, write out); no temporary of the tile's size.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../dispatch.h"
#include "tile_blend.h"

namespace osp {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t K = fVec::size();

template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

template <typename T>
inline void store_f(T* p, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, K);
  }
}

template <typename O, typename I>
void blend_rows(O* out, const I* tile, int64_t BC, int64_t T, int64_t H, int64_t W, int64_t t, int64_t h,
                int64_t w, const int64_t* off, const float* rt, const float* rh, const float* rw) {
  const int64_t rows = BC * t * h;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(w, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bc = r / (t * h), th = r % (t * h), i = th / h, j = th % h;
      const float a = rt[i] * rh[j];  // the weight is (rt * rh) * rw, in torch's order
      const I* src = tile + r * w;
      O* dst = out + ((bc * T + off[0] + i) * H + off[1] + j) * W + off[2];
      const fVec av(a);
      int64_t k = 0;
      for (; k + K <= w; k += K) {
        store_f(dst + k, at::vec::fmadd(load_f(src + k), av * fVec::loadu(rw + k), load_f(dst + k)));
      }
      for (; k < w; ++k) {
        dst[k] = static_cast<O>(static_cast<float>(dst[k]) + static_cast<float>(src[k]) * (a * rw[k]));
      }
    }
  });
}

}  // namespace

void blend_tile_kernel(at::Tensor& out, at::Tensor& wsum, const at::Tensor& tile, const int64_t* offset,
                       const float* rt, const float* rh, const float* rw) {
  const int64_t BC = out.size(0) * out.size(1), T = out.size(2), H = out.size(3), W = out.size(4);
  const int64_t t = tile.size(2), h = tile.size(3), w = tile.size(4);
  OSP_DISPATCH_FLOATS(out.scalar_type(), "blend_tile_out", [&] {
    using out_t = scalar_t;
    OSP_DISPATCH_FLOATS(tile.scalar_type(), "blend_tile_tile", [&] {
      blend_rows<out_t, scalar_t>(out.data_ptr<out_t>(), tile.const_data_ptr<scalar_t>(), BC, T, H, W, t, h, w,
                                  offset, rt, rh, rw);
    });
  });
  float* ws = wsum.data_ptr<float>();
  at::parallel_for(0, t * h, std::max<int64_t>(1, 4096 / std::max<int64_t>(w, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / h, j = r % h;
      const float a = rt[i] * rh[j];
      float* dst = ws + ((offset[0] + i) * H + offset[1] + j) * W + offset[2];
      for (int64_t k = 0; k < w; ++k) dst[k] += a * rw[k];
    }
  });
}

void blend_normalize_kernel(at::Tensor& out, const at::Tensor& wsum) {
  const int64_t BC = out.size(0) * out.size(1), S = wsum.numel();
  const float* ws = wsum.const_data_ptr<float>();
  OSP_DISPATCH_FLOATS(out.scalar_type(), "blend_normalize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t block = 4096, nb = (S + block - 1) / block;
    at::parallel_for(0, BC * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t bc = task / nb, s0 = (task % nb) * block, L = std::min(block, S - s0);
        scalar_t* p = o + bc * S + s0;
        const float* q = ws + s0;
        int64_t k = 0;
        for (; k + K <= L; k += K) store_f(p + k, load_f(p + k) / fVec::loadu(q + k));
        for (; k < L; ++k) p[k] = static_cast<scalar_t>(static_cast<float>(p[k]) / q[k]);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace osp
