// layer_norm_modulate CPU kernels, compiled once per ISA level. One row (token) of D elements is
// normalized by exact two-pass moments (the row stays in cache); the backward computes dx row by
// row and the per-batch-entry dshift/dscale from fixed blocks of rows summed in block order
// (deterministic for any thread count).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "modulation.h"

namespace osp {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t K = fVec::size();
constexpr int64_t kRows = 32;  // rows per block of the dshift/dscale reduction

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

inline float hsum(const fVec& v) {
  float buf[K];
  v.store(buf);
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += buf[k];
  return s;
}

template <typename T>
void forward_rows(const T* x, const float* shift, const float* scale, int64_t B, int64_t L, int64_t D, bool shared_shift,
                  bool shared_scale, float eps, T* y, float* mean, float* rstd) {
  at::parallel_for(0, B * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      const int64_t b = r / L;
      const float* sh = shift + (shared_shift ? 0 : b) * D;
      const float* sc = scale + (shared_scale ? 0 : b) * D;
      fVec acc(0.f);
      int64_t k = 0;
      for (; k + K <= D; k += K) acc += load_f(xr + k);
      float s = hsum(acc);
      for (; k < D; ++k) s += static_cast<float>(xr[k]);
      const float m = s / static_cast<float>(D);
      fVec acc2(0.f);
      const fVec mv(m);
      for (k = 0; k + K <= D; k += K) {
        const fVec d = load_f(xr + k) - mv;
        acc2 = at::vec::fmadd(d, d, acc2);
      }
      float m2 = hsum(acc2);
      for (; k < D; ++k) {
        const float d = static_cast<float>(xr[k]) - m;
        m2 += d * d;
      }
      const float rs = 1.f / std::sqrt(m2 / static_cast<float>(D) + eps);
      mean[r] = m;
      rstd[r] = rs;
      T* yr = y + r * D;
      const fVec rv(rs), one(1.f);
      for (k = 0; k + K <= D; k += K) {
        const fVec xhat = (load_f(xr + k) - mv) * rv;
        store_f(yr + k, at::vec::fmadd(xhat, one + fVec::loadu(sc + k), fVec::loadu(sh + k)));
      }
      for (; k < D; ++k) {
        const float xhat = (static_cast<float>(xr[k]) - m) * rs;
        yr[k] = static_cast<T>(xhat * (1.f + sc[k]) + sh[k]);
      }
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* x, const float* scale, const float* mean, const float* rstd, int64_t B,
                   int64_t L, int64_t D, int64_t Bm, T* dx, float* dshift, float* dscale) {
  const int64_t nb = (L + kRows - 1) / kRows;
  std::vector<float> pshift(B * nb * D), pscale(B * nb * D);
  at::parallel_for(0, B * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nb, l0 = (t % nb) * kRows, rows = std::min(kRows, L - l0);
      const float* sc = scale + (Bm == 1 ? 0 : b) * D;
      float* ps = pshift.data() + t * D;
      float* pc = pscale.data() + t * D;
      std::fill(ps, ps + D, 0.f);
      std::fill(pc, pc + D, 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = b * L + l0 + i;
        const T* xr = x + r * D;
        const T* gr = dy + r * D;
        const float m = mean[r], rs = rstd[r];
        const fVec mv(m), rv(rs), one(1.f);
        // Row sums of g = dy (1 + scale) and g xhat; block sums of dy and dy xhat.
        fVec sg(0.f), sgx(0.f);
        int64_t k = 0;
        for (; k + K <= D; k += K) {
          const fVec xhat = (load_f(xr + k) - mv) * rv;
          const fVec d = load_f(gr + k);
          const fVec g = d * (one + fVec::loadu(sc + k));
          sg += g;
          sgx = at::vec::fmadd(g, xhat, sgx);
          (fVec::loadu(ps + k) + d).store(ps + k);
          at::vec::fmadd(d, xhat, fVec::loadu(pc + k)).store(pc + k);
        }
        float sum_g = hsum(sg), sum_gx = hsum(sgx);
        for (; k < D; ++k) {
          const float xhat = (static_cast<float>(xr[k]) - m) * rs;
          const float d = static_cast<float>(gr[k]);
          const float g = d * (1.f + sc[k]);
          sum_g += g;
          sum_gx += g * xhat;
          ps[k] += d;
          pc[k] += d * xhat;
        }
        // dx = rstd (g - mean(g) - xhat mean(g xhat))
        const float a = sum_g / static_cast<float>(D), c = sum_gx / static_cast<float>(D);
        const fVec av(a), cv(c);
        T* out = dx + r * D;
        for (k = 0; k + K <= D; k += K) {
          const fVec xhat = (load_f(xr + k) - mv) * rv;
          const fVec g = load_f(gr + k) * (one + fVec::loadu(sc + k));
          store_f(out + k, rv * (g - av - xhat * cv));
        }
        for (; k < D; ++k) {
          const float xhat = (static_cast<float>(xr[k]) - m) * rs;
          const float g = static_cast<float>(gr[k]) * (1.f + sc[k]);
          out[k] = static_cast<T>(rs * (g - a - xhat * c));
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      double s = 0.0, c = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) {
        s += pshift[(b * nb + blk) * D + d];
        c += pscale[(b * nb + blk) * D + d];
      }
      dshift[b * D + d] = static_cast<float>(s);
      dscale[b * D + d] = static_cast<float>(c);
    }
  }
}

template <typename T>
void gated_rows(const T* x, const T* gate, const T* y, int64_t B, int64_t L, int64_t D, bool shared, T* out) {
  at::parallel_for(0, B * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gate + (shared ? 0 : r / L) * D;
      const int64_t o = r * D;
      int64_t k = 0;
      for (; k + K <= D; k += K) store_f(out + o + k, at::vec::fmadd(load_f(g + k), load_f(y + o + k), load_f(x + o + k)));
      for (; k < D; ++k) {
        out[o + k] = static_cast<T>(static_cast<float>(x[o + k]) + static_cast<float>(g[k]) * static_cast<float>(y[o + k]));
      }
    }
  });
}

template <typename T>
void gated_backward_rows(const T* dout, const T* gate, const T* y, int64_t B, int64_t L, int64_t D, bool shared, T* dy,
                         float* dgate) {
  const int64_t nb = (L + kRows - 1) / kRows;
  std::vector<float> part(B * nb * D);
  at::parallel_for(0, B * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nb, l0 = (t % nb) * kRows, rows = std::min(kRows, L - l0);
      const T* g = gate + (shared ? 0 : b) * D;
      float* acc = part.data() + t * D;
      std::fill(acc, acc + D, 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t o = (b * L + l0 + i) * D;
        int64_t k = 0;
        for (; k + K <= D; k += K) {
          const fVec d = load_f(dout + o + k);
          store_f(dy + o + k, d * load_f(g + k));
          at::vec::fmadd(d, load_f(y + o + k), fVec::loadu(acc + k)).store(acc + k);
        }
        for (; k < D; ++k) {
          const float d = static_cast<float>(dout[o + k]);
          dy[o + k] = static_cast<T>(d * static_cast<float>(g[k]));
          acc[k] += d * static_cast<float>(y[o + k]);
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      double s = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) s += part[(b * nb + blk) * D + d];
      dgate[b * D + d] = static_cast<float>(s);
    }
  }
}

}  // namespace

void gated_residual_kernel(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, at::Tensor& out) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  OSP_DISPATCH_FLOATS(x.scalar_type(), "gated_residual", [&] {
    gated_rows<scalar_t>(x.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                         B, L, D, gate.size(0) == 1, out.mutable_data_ptr<scalar_t>());
  });
}

void gated_residual_backward_kernel(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& y,
                                    at::Tensor& dy, at::Tensor& dgate) {
  const int64_t B = y.size(0), L = y.size(1), D = y.size(2);
  OSP_DISPATCH_FLOATS(y.scalar_type(), "gated_residual_backward", [&] {
    gated_backward_rows<scalar_t>(dout.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                                  y.const_data_ptr<scalar_t>(), B, L, D, gate.size(0) == 1,
                                  dy.mutable_data_ptr<scalar_t>(), dgate.mutable_data_ptr<float>());
  });
}

void layer_norm_modulate_kernel(const at::Tensor& x, const at::Tensor& shift_f, const at::Tensor& scale_f, double eps,
                                at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const bool shared_shift = shift_f.size(0) == 1, shared_scale = scale_f.size(0) == 1;
  OSP_DISPATCH_FLOATS(x.scalar_type(), "layer_norm_modulate", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), shift_f.const_data_ptr<float>(),
                           scale_f.const_data_ptr<float>(), B, L, D, shared_shift, shared_scale, static_cast<float>(eps),
                           y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                           rstd.mutable_data_ptr<float>());
  });
}

void layer_norm_modulate_backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale_f,
                                         const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                                         at::Tensor& dshift, at::Tensor& dscale) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), Bm = scale_f.size(0);
  OSP_DISPATCH_FLOATS(x.scalar_type(), "layer_norm_modulate_backward", [&] {
    backward_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            scale_f.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                            rstd.const_data_ptr<float>(), B, L, D, Bm, dx.mutable_data_ptr<scalar_t>(),
                            dshift.mutable_data_ptr<float>(), dscale.mutable_data_ptr<float>());
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace osp
