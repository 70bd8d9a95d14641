// GroupNorm + SiLU CPU kernels, compiled once per ISA level (CPU_CAPABILITY = DEFAULT, AVX2, AVX512).
//
// Statistics: every (sample, group) is cut into fixed-size blocks of the spatial extent (channel-first:
// kBlock consecutive elements; channels-last: kBlock / C rows of C channels); each block gives exact
// two-pass moments (mean, then the sum of squared deviations, from cache), and the blocks are merged
// by Chan's formula in block order, in double. The block size does not depend on the thread count, so
// results are bit-identical from run to run and across thread counts. Everything accumulates in fp32
// (fp64 across blocks); 64-bit offsets throughout.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "group_norm.h"

namespace osp {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t K = fVec::size();
constexpr int64_t kBlock = 4096;

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

inline fVec sigmoid_v(const fVec& z) { return fVec(1.f) / (fVec(1.f) + z.neg().exp()); }
inline float sigmoid_s(float z) { return 1.f / (1.f + std::exp(-z)); }
// silu(z) = z sigmoid(z);  silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z)
inline fVec silu_v(const fVec& z) { return z * sigmoid_v(z); }
inline float silu_s(float z) { return z * sigmoid_s(z); }
inline fVec dsilu_v(const fVec& z) {
  fVec s = sigmoid_v(z);
  return s * (fVec(1.f) + z * (fVec(1.f) - s));
}
inline float dsilu_s(float z) {
  float s = sigmoid_s(z);
  return s * (1.f + z * (1.f - s));
}

inline float hsum(const fVec& v) {
  float buf[K];
  v.store(buf);
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += buf[k];
  return s;
}

struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

inline void chan_merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  const double n = a.n + b.n;
  const double d = b.mean - a.mean;
  a.mean += d * (b.n / n);
  a.m2 += b.m2 + d * d * (a.n * b.n / n);
  a.n = n;
}

// part[(ng * nb) + b]: merged in block order b = 0, 1, ... for each (sample, group) ng.
void finalize(const std::vector<Moments>& part, int64_t NG, int64_t nb, double eps, float* mean, float* rstd) {
  for (int64_t ng = 0; ng < NG; ++ng) {
    Moments m;
    for (int64_t b = 0; b < nb; ++b) chan_merge(m, part[ng * nb + b]);
    const double var = m.n > 0 ? std::max(m.m2 / m.n, 0.0) : 0.0;
    mean[ng] = static_cast<float>(m.mean);
    rstd[ng] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

template <typename T>
Moments span_moments(const T* p, int64_t L) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + K <= L; i += K) acc += load_f(p + i);
  float s = hsum(acc);
  for (; i < L; ++i) s += static_cast<float>(p[i]);
  const float mean = s / static_cast<float>(L);
  const fVec mv(mean);
  fVec acc2(0.f);
  i = 0;
  for (; i + K <= L; i += K) {
    const fVec d = load_f(p + i) - mv;
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  float m2 = hsum(acc2);
  for (; i < L; ++i) {
    const float d = static_cast<float>(p[i]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(L), static_cast<double>(mean), static_cast<double>(m2)};
}

template <typename T>
void stats_channels_first(const T* x, int64_t N, int64_t C, int64_t S, int64_t G, double eps, float* mean,
                          float* rstd) {
  const int64_t D = (C / G) * S;  // one (sample, group) is D consecutive elements
  const int64_t nb = (D + kBlock - 1) / kBlock;
  std::vector<Moments> part(N * G * nb);
  at::parallel_for(0, N * G * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ng = t / nb, off = (t % nb) * kBlock;
      part[t] = span_moments(x + ng * D + off, std::min(kBlock, D - off));
    }
  });
  finalize(part, N * G, nb, eps, mean, rstd);
}

template <typename T>
void stats_channels_last(const T* x, int64_t N, int64_t C, int64_t S, int64_t G, double eps, float* mean,
                         float* rstd) {
  const int64_t Cg = C / G;
  const int64_t R = std::max<int64_t>(1, kBlock / C);  // rows (spatial positions) per block
  const int64_t nb = (S + R - 1) / R;
  std::vector<Moments> part(N * G * nb);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(C), cmean(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, b = t % nb, s0 = b * R, rows = std::min(R, S - s0);
      const T* base = x + (n * S + s0) * C;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = base + r * C;
        int64_t c = 0;
        for (; c + K <= C; c += K) (fVec::loadu(acc.data() + c) + load_f(row + c)).store(acc.data() + c);
        for (; c < C; ++c) acc[c] += static_cast<float>(row[c]);
      }
      const float cnt = static_cast<float>(Cg * rows);
      std::vector<float> gmean(G);
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) s += acc[c];
        gmean[g] = s / cnt;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) cmean[c] = gmean[g];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = base + r * C;
        int64_t c = 0;
        for (; c + K <= C; c += K) {
          const fVec d = load_f(row + c) - fVec::loadu(cmean.data() + c);
          at::vec::fmadd(d, d, fVec::loadu(acc.data() + c)).store(acc.data() + c);
        }
        for (; c < C; ++c) {
          const float d = static_cast<float>(row[c]) - cmean[c];
          acc[c] += d * d;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float m2 = 0.f;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m2 += acc[c];
        part[(n * G + g) * nb + b] = {static_cast<double>(cnt), static_cast<double>(gmean[g]),
                                      static_cast<double>(m2)};
      }
    }
  });
  finalize(part, N * G, nb, eps, mean, rstd);
}

// Per (sample, channel) scale and shift: y = act(x * scale + shift).
void scale_shift(int64_t N, int64_t C, int64_t G, const float* mean, const float* rstd, const float* w,
                 const float* b, std::vector<float>& scale, std::vector<float>& shift) {
  const int64_t Cg = C / G;
  scale.resize(N * C);
  shift.resize(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / Cg;
      const float s = rstd[ng] * (w ? w[c] : 1.f);
      scale[n * C + c] = s;
      shift[n * C + c] = (b ? b[c] : 0.f) - mean[ng] * s;
    }
  }
}

template <typename T, bool SILU>
void apply_impl(const T* x, T* y, int64_t N, int64_t C, int64_t S, bool channels_last, const float* scale,
                const float* shift) {
  if (!channels_last) {
    const int64_t nb = (S + kBlock - 1) / kBlock;
    at::parallel_for(0, N * C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t / nb, off = (t % nb) * kBlock, L = std::min(kBlock, S - off);
        const T* p = x + row * S + off;
        T* q = y + row * S + off;
        const fVec a(scale[row]), b(shift[row]);
        int64_t i = 0;
        for (; i + K <= L; i += K) {
          fVec z = at::vec::fmadd(load_f(p + i), a, b);
          if constexpr (SILU) z = silu_v(z);
          store_f(q + i, z);
        }
        for (; i < L; ++i) {
          float z = static_cast<float>(p[i]) * scale[row] + shift[row];
          if constexpr (SILU) z = silu_s(z);
          q[i] = static_cast<T>(z);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * S, std::max<int64_t>(1, kBlock / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / S;
      const T* p = x + r * C;
      T* q = y + r * C;
      const float* sc = scale + n * C;
      const float* sh = shift + n * C;
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        fVec z = at::vec::fmadd(load_f(p + c), fVec::loadu(sc + c), fVec::loadu(sh + c));
        if constexpr (SILU) z = silu_v(z);
        store_f(q + c, z);
      }
      for (; c < C; ++c) {
        float z = static_cast<float>(p[c]) * sc[c] + sh[c];
        if constexpr (SILU) z = silu_s(z);
        q[c] = static_cast<T>(z);
      }
    }
  });
}

// Backward pass 1: A[n, c] = sum_s dz, B[n, c] = sum_s dz (x - mean), dz = dy * act'(z).
template <typename T, bool SILU>
void backward_sums(const T* dy, const T* x, int64_t N, int64_t C, int64_t S, bool channels_last,
                   const float* scale, const float* shift, const float* cmean, std::vector<double>& A,
                   std::vector<double>& B) {
  A.assign(N * C, 0.0);
  B.assign(N * C, 0.0);
  if (!channels_last) {
    const int64_t nb = (S + kBlock - 1) / kBlock;
    std::vector<float> pa(N * C * nb), pb(N * C * nb);
    at::parallel_for(0, N * C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t / nb, off = (t % nb) * kBlock, L = std::min(kBlock, S - off);
        const T* xp = x + row * S + off;
        const T* gp = dy + row * S + off;
        const fVec a(scale[row]), b(shift[row]), m(cmean[row]);
        fVec accA(0.f), accB(0.f);
        int64_t i = 0;
        for (; i + K <= L; i += K) {
          const fVec xv = load_f(xp + i);
          fVec dz = load_f(gp + i);
          if constexpr (SILU) dz = dz * dsilu_v(at::vec::fmadd(xv, a, b));
          accA += dz;
          accB = at::vec::fmadd(dz, xv - m, accB);
        }
        float sa = hsum(accA), sb = hsum(accB);
        for (; i < L; ++i) {
          const float xv = static_cast<float>(xp[i]);
          float dz = static_cast<float>(gp[i]);
          if constexpr (SILU) dz *= dsilu_s(xv * scale[row] + shift[row]);
          sa += dz;
          sb += dz * (xv - cmean[row]);
        }
        pa[t] = sa;
        pb[t] = sb;
      }
    });
    for (int64_t row = 0; row < N * C; ++row) {
      for (int64_t b = 0; b < nb; ++b) {
        A[row] += pa[row * nb + b];
        B[row] += pb[row * nb + b];
      }
    }
    return;
  }
  const int64_t R = std::max<int64_t>(1, kBlock / C);
  const int64_t nb = (S + R - 1) / R;
  std::vector<float> pa(N * nb * C), pb(N * nb * C);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, s0 = (t % nb) * R, rows = std::min(R, S - s0);
      float* a_acc = pa.data() + t * C;
      float* b_acc = pb.data() + t * C;
      std::fill(a_acc, a_acc + C, 0.f);
      std::fill(b_acc, b_acc + C, 0.f);
      const float* sc = scale + n * C;
      const float* sh = shift + n * C;
      const float* cm = cmean + n * C;
      for (int64_t r = 0; r < rows; ++r) {
        const T* xp = x + (n * S + s0 + r) * C;
        const T* gp = dy + (n * S + s0 + r) * C;
        int64_t c = 0;
        for (; c + K <= C; c += K) {
          const fVec xv = load_f(xp + c);
          fVec dz = load_f(gp + c);
          if constexpr (SILU) dz = dz * dsilu_v(at::vec::fmadd(xv, fVec::loadu(sc + c), fVec::loadu(sh + c)));
          (fVec::loadu(a_acc + c) + dz).store(a_acc + c);
          at::vec::fmadd(dz, xv - fVec::loadu(cm + c), fVec::loadu(b_acc + c)).store(b_acc + c);
        }
        for (; c < C; ++c) {
          const float xv = static_cast<float>(xp[c]);
          float dz = static_cast<float>(gp[c]);
          if constexpr (SILU) dz *= dsilu_s(xv * sc[c] + sh[c]);
          a_acc[c] += dz;
          b_acc[c] += dz * (xv - cm[c]);
        }
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* a_part = pa.data() + (n * nb + b) * C;
      const float* b_part = pb.data() + (n * nb + b) * C;
      for (int64_t c = 0; c < C; ++c) {
        A[n * C + c] += a_part[c];
        B[n * C + c] += b_part[c];
      }
    }
  }
}

// Backward pass 2: dx = alpha dz + k1 (x - mean) + k0, per (sample, channel) coefficients.
template <typename T, bool SILU>
void backward_dx(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, bool channels_last,
                 const float* scale, const float* shift, const float* cmean, const float* alpha, const float* k1,
                 const float* k0) {
  auto one = [&](const T* xp, const T* gp, T* op, int64_t L, const float* sc, const float* sh, const float* cm,
                 const float* al, const float* c1, const float* c0, bool per_element) {
    // per_element: the coefficient arrays run along the span (channels-last row), else one value.
    int64_t i = 0;
    for (; i + K <= L; i += K) {
      const int64_t j = per_element ? i : 0;
      const fVec a = per_element ? fVec::loadu(sc + j) : fVec(sc[0]);
      const fVec b = per_element ? fVec::loadu(sh + j) : fVec(sh[0]);
      const fVec m = per_element ? fVec::loadu(cm + j) : fVec(cm[0]);
      const fVec v_al = per_element ? fVec::loadu(al + j) : fVec(al[0]);
      const fVec v_k1 = per_element ? fVec::loadu(c1 + j) : fVec(c1[0]);
      const fVec v_k0 = per_element ? fVec::loadu(c0 + j) : fVec(c0[0]);
      const fVec xv = load_f(xp + i);
      fVec dz = load_f(gp + i);
      if constexpr (SILU) dz = dz * dsilu_v(at::vec::fmadd(xv, a, b));
      store_f(op + i, at::vec::fmadd(v_al, dz, at::vec::fmadd(v_k1, xv - m, v_k0)));
    }
    for (; i < L; ++i) {
      const int64_t j = per_element ? i : 0;
      const float xv = static_cast<float>(xp[i]);
      float dz = static_cast<float>(gp[i]);
      if constexpr (SILU) dz *= dsilu_s(xv * sc[j] + sh[j]);
      op[i] = static_cast<T>(al[j] * dz + (c1[j] * (xv - cm[j]) + c0[j]));
    }
  };
  if (!channels_last) {
    const int64_t nb = (S + kBlock - 1) / kBlock;
    at::parallel_for(0, N * C * nb, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t / nb, off = (t % nb) * kBlock, L = std::min(kBlock, S - off);
        const int64_t o = row * S + off;
        one(x + o, dy + o, dx + o, L, scale + row, shift + row, cmean + row, alpha + row, k1 + row, k0 + row,
            false);
      }
    });
    return;
  }
  at::parallel_for(0, N * S, std::max<int64_t>(1, kBlock / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / S, o = r * C, p = n * C;
      one(x + o, dy + o, dx + o, C, scale + p, shift + p, cmean + p, alpha + p, k1 + p, k0 + p, true);
    }
  });
}

const float* opt_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

}  // namespace

void group_norm_stats_kernel(const at::Tensor& x, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last,
                             double eps, at::Tensor& mean, at::Tensor& rstd) {
  OSP_DISPATCH_FLOATS(x.scalar_type(), "group_norm_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    float* m = mean.mutable_data_ptr<float>();
    float* r = rstd.mutable_data_ptr<float>();
    if (channels_last) {
      stats_channels_last(xp, N, C, S, G, eps, m, r);
    } else {
      stats_channels_first(xp, N, C, S, G, eps, m, r);
    }
  });
}

void group_norm_apply_kernel(const at::Tensor& x, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last,
                             const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                             const at::Tensor& bias, bool silu, at::Tensor& y) {
  std::vector<float> scale, shift;
  scale_shift(N, C, G, mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), opt_ptr(weight), opt_ptr(bias),
              scale, shift);
  OSP_DISPATCH_FLOATS(x.scalar_type(), "group_norm_apply", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();  // may alias x (the in-place form)
    if (silu) {
      apply_impl<scalar_t, true>(xp, yp, N, C, S, channels_last, scale.data(), shift.data());
    } else {
      apply_impl<scalar_t, false>(xp, yp, N, C, S, channels_last, scale.data(), shift.data());
    }
  });
}

void group_norm_backward_kernel(const at::Tensor& dy, const at::Tensor& x, int64_t N, int64_t C, int64_t S,
                                int64_t G, bool channels_last, const at::Tensor& mean, const at::Tensor& rstd,
                                const at::Tensor& weight, const at::Tensor& bias, bool silu, bool compute_dx,
                                at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  const float* wp = opt_ptr(weight);
  const int64_t Cg = C / G;
  std::vector<float> scale, shift, cmean(N * C);
  scale_shift(N, C, G, mp, rp, wp, opt_ptr(bias), scale, shift);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) cmean[n * C + c] = mp[n * G + c / Cg];
  std::vector<double> A, B;
  OSP_DISPATCH_FLOATS(x.scalar_type(), "group_norm_backward_sums", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    if (silu) {
      backward_sums<scalar_t, true>(gp, xp, N, C, S, channels_last, scale.data(), shift.data(), cmean.data(), A, B);
    } else {
      backward_sums<scalar_t, false>(gp, xp, N, C, S, channels_last, scale.data(), shift.data(), cmean.data(), A, B);
    }
  });
  // dweight[c] = sum_n rstd B[n, c]; dbias[c] = sum_n A[n, c]  (sample order: deterministic).
  float* dw = dweight.mutable_data_ptr<float>();
  float* db = dbias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      sw += static_cast<double>(rp[n * G + c / Cg]) * B[n * C + c];
      sb += A[n * C + c];
    }
    dw[c] = static_cast<float>(sw);
    db[c] = static_cast<float>(sb);
  }
  if (!compute_dx) return;
  // dx = rstd (w dz - mean_g(w dz) - xhat mean_g(w dz xhat)), xhat = (x - mean) rstd.
  std::vector<float> alpha(N * C), k1(N * C), k0(N * C);
  const double D = static_cast<double>(Cg * S);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const double r = rp[n * G + g];
      double sd = 0.0, sdx = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double w = wp ? wp[c] : 1.0;
        sd += w * A[n * C + c];
        sdx += w * B[n * C + c];
      }
      const float c1 = static_cast<float>(-r * r * r * sdx / D);
      const float c0 = static_cast<float>(-r * sd / D);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        alpha[n * C + c] = static_cast<float>(r * (wp ? wp[c] : 1.0));
        k1[n * C + c] = c1;
        k0[n * C + c] = c0;
      }
    }
  }
  OSP_DISPATCH_FLOATS(x.scalar_type(), "group_norm_backward_dx", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* op = dx.mutable_data_ptr<scalar_t>();
    if (silu) {
      backward_dx<scalar_t, true>(gp, xp, op, N, C, S, channels_last, scale.data(), shift.data(), cmean.data(),
                                  alpha.data(), k1.data(), k0.data());
    } else {
      backward_dx<scalar_t, false>(gp, xp, op, N, C, S, channels_last, scale.data(), shift.data(), cmean.data(),
                                   alpha.data(), k1.data(), k0.data());
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace osp
