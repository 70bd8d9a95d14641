// GroupNorm + SiLU CUDA kernels: the twin of group_norm_cpu_kernel.cpp. Free of ATen (raw pointers
// and a stream), so they compile with nvcc alone (bench/compile_check.py --nvcc: sm_90, no GPU and
// no CUDA torch needed). Not yet bound to torch: the CUDA TORCH_LIBRARY_IMPL needs a CUDA build of
// torch, and GPUs are served by the Triton kernel meanwhile.
//
// Forward: a split reduction. Each (sample, group) of D = C/G * S elements is cut into blocks of
// kBlockElems; one CUDA block per piece computes exact moments (Welford per thread, then Chan merges
// in a fixed tree order), a finalize kernel merges the pieces in order (deterministic), and the apply
// kernel writes act(x * scale + shift) with 16-byte loads where the layout allows.
// Backward: per (sample, channel) partial sums of dz and dz (x - mean) over spatial blocks, a finalize
// that forms the dx coefficients and the weight/bias gradients (summed over samples in order), and an
// elementwise dx kernel. Statistics and accumulation in fp32; 64-bit offsets.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace osp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = 16384;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid_f(float z) { return 1.f / (1.f + __expf(-z)); }

struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, const Moments& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n, d = b.mean - a.mean;
  a.mean += d * (b.n / n);
  a.m2 += b.m2 + d * d * (a.n * b.n / n);
  a.n = n;
  return a;
}

// Offset of element i (0 <= i < C/G * S) of group g of sample n.
__device__ __forceinline__ int64_t group_offset(int64_t i, int64_t n, int64_t g, int64_t C, int64_t S, int64_t Cg,
                                                bool channels_last) {
  if (!channels_last) return (n * C + g * Cg) * S + i;
  const int64_t s = i / Cg, c = g * Cg + i % Cg;
  return (n * S + s) * C + c;
}

__device__ __forceinline__ int64_t channel_of(int64_t off, int64_t C, int64_t S, bool channels_last) {
  return channels_last ? off % C : (off / S) % C;
}

// grid (nb, N * G): partial moments of block b of group ng.
template <typename T>
__global__ void gn_stats_partial(const T* __restrict__ x, int64_t C, int64_t S, int64_t G, bool channels_last,
                                 int64_t nb, float* __restrict__ part) {
  const int64_t ng = blockIdx.y, n = ng / G, g = ng % G, Cg = C / G, D = Cg * S;
  const int64_t begin = blockIdx.x * kBlockElems, end = min(begin + kBlockElems, D);
  Moments m{0.f, 0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_f(x[group_offset(i, n, g, C, S, Cg, channels_last)]);
    m.n += 1.f;
    const float d = v - m.mean;
    m.mean += d / m.n;
    m.m2 += d * (v - m.mean);
  }
  __shared__ Moments sh[kThreads];
  sh[threadIdx.x] = m;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {  // fixed tree: deterministic
    if (threadIdx.x < stride) sh[threadIdx.x] = merge(sh[threadIdx.x], sh[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* p = part + (ng * nb + blockIdx.x) * 3;
    p[0] = sh[0].n;
    p[1] = sh[0].mean;
    p[2] = sh[0].m2;
  }
}

// One thread per (sample, group): merge the blocks in order.
__global__ void gn_stats_finalize(const float* __restrict__ part, int64_t NG, int64_t nb, float eps,
                                  float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t ng = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (ng >= NG) return;
  Moments m{0.f, 0.f, 0.f};
  for (int64_t b = 0; b < nb; ++b) {
    const float* p = part + (ng * nb + b) * 3;
    m = merge(m, Moments{p[0], p[1], p[2]});
  }
  mean[ng] = m.mean;
  rstd[ng] = rsqrtf(fmaxf(m.m2 / m.n, 0.f) + eps);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// y = act(x * scale[n, c] + shift[n, c]); VEC consecutive elements share (n, and for channel-first) c.
template <typename T, int VEC, bool SILU>
__global__ void gn_apply(const T* __restrict__ x, T* __restrict__ y, int64_t total, int64_t C, int64_t S,
                         bool channels_last, const float* __restrict__ scale, const float* __restrict__ shift) {
  const int64_t packs = total / VEC;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < packs; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t off = p * VEC;
    const int64_t n = channels_last ? off / (S * C) : off / (C * S);
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = channel_of(off + k, C, S, channels_last);
      float z = to_f(in.v[k]) * scale[n * C + c] + shift[n * C + c];
      if (SILU) z = z * sigmoid_f(z);
      out.v[k] = from_f<T>(z);
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + off) = out;
  }
}

// scale = rstd * w, shift = b - mean * scale, per (sample, channel); cmean = the channel's group mean.
__global__ void gn_scale_shift(const float* __restrict__ mean, const float* __restrict__ rstd,
                               const float* __restrict__ w, const float* __restrict__ b, int64_t N, int64_t C,
                               int64_t G, float* __restrict__ scale, float* __restrict__ shift,
                               float* __restrict__ cmean) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C, ng = n * G + c / (C / G);
  const float s = rstd[ng] * (w ? w[c] : 1.f);
  scale[i] = s;
  shift[i] = (b ? b[c] : 0.f) - mean[ng] * s;
  if (cmean) cmean[i] = mean[ng];
}

// grid (nb, N * C): partial sums over spatial block b of dz and dz (x - mean), dz = dy act'(z).
template <typename T, bool SILU>
__global__ void gn_bwd_partial(const T* __restrict__ dy, const T* __restrict__ x, int64_t C, int64_t S,
                               bool channels_last, int64_t nb, const float* __restrict__ scale,
                               const float* __restrict__ shift, const float* __restrict__ cmean,
                               float* __restrict__ pa, float* __restrict__ pb) {
  const int64_t nc = blockIdx.y, n = nc / C, c = nc % C;
  const int64_t begin = blockIdx.x * kBlockElems, end = min(begin + kBlockElems, S);
  const float a = scale[nc], sh = shift[nc], m = cmean[nc];
  float sa = 0.f, sb = 0.f;
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int64_t off = channels_last ? (n * S + s) * C + c : nc * S + s;
    const float xv = to_f(x[off]);
    float dz = to_f(dy[off]);
    if (SILU) {
      const float z = xv * a + sh, sg = sigmoid_f(z);
      dz *= sg * (1.f + z * (1.f - sg));
    }
    sa += dz;
    sb += dz * (xv - m);
  }
  __shared__ float ra[kThreads], rb[kThreads];
  ra[threadIdx.x] = sa;
  rb[threadIdx.x] = sb;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      ra[threadIdx.x] += ra[threadIdx.x + stride];
      rb[threadIdx.x] += rb[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    pa[nc * nb + blockIdx.x] = ra[0];
    pb[nc * nb + blockIdx.x] = rb[0];
  }
}

// One thread per (sample, group): A, B per channel (blocks in order), then the dx coefficients
// dx = alpha dz + k1 (x - mean) + k0; A and B are kept per (sample, channel) for the parameters.
__global__ void gn_bwd_finalize(const float* __restrict__ pa, const float* __restrict__ pb, int64_t nb,
                                const float* __restrict__ rstd, const float* __restrict__ w, int64_t N, int64_t C,
                                int64_t G, int64_t S, float* __restrict__ A, float* __restrict__ B,
                                float* __restrict__ alpha, float* __restrict__ k1, float* __restrict__ k0) {
  const int64_t ng = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (ng >= N * G) return;
  const int64_t n = ng / G, g = ng % G, Cg = C / G;
  const float r = rstd[ng];
  float sd = 0.f, sdx = 0.f;
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    float a = 0.f, b = 0.f;
    for (int64_t blk = 0; blk < nb; ++blk) {
      a += pa[(n * C + c) * nb + blk];
      b += pb[(n * C + c) * nb + blk];
    }
    A[n * C + c] = a;
    B[n * C + c] = b;
    const float wc = w ? w[c] : 1.f;
    sd += wc * a;
    sdx += wc * b;
  }
  const float D = static_cast<float>(Cg * S);
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    alpha[n * C + c] = r * (w ? w[c] : 1.f);
    k1[n * C + c] = -r * r * r * sdx / D;
    k0[n * C + c] = -r * sd / D;
  }
}

// One thread per channel: dweight = sum_n rstd B, dbias = sum_n A (samples in order).
__global__ void gn_bwd_params(const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ rstd,
                              int64_t N, int64_t C, int64_t G, float* __restrict__ dweight, float* __restrict__ dbias) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    sw += rstd[n * G + c / (C / G)] * B[n * C + c];
    sb += A[n * C + c];
  }
  dweight[c] = sw;
  dbias[c] = sb;
}

template <typename T, bool SILU>
__global__ void gn_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t total,
                          int64_t C, int64_t S, bool channels_last, const float* __restrict__ scale,
                          const float* __restrict__ shift, const float* __restrict__ cmean,
                          const float* __restrict__ alpha, const float* __restrict__ k1, const float* __restrict__ k0) {
  for (int64_t off = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; off < total;
       off += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = off / (C * S), i = n * C + channel_of(off, C, S, channels_last);
    const float xv = to_f(x[off]);
    float dz = to_f(dy[off]);
    if (SILU) {
      const float z = xv * scale[i] + shift[i], sg = sigmoid_f(z);
      dz *= sg * (1.f + z * (1.f - sg));
    }
    dx[off] = from_f<T>(alpha[i] * dz + k1[i] * (xv - cmean[i]) + k0[i]);
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T>
void forward_impl(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, float eps,
                  const float* w, const float* b, bool silu, float* mean, float* rstd, float* workspace,
                  cudaStream_t stream) {
  const int64_t D = (C / G) * S, nb = (D + kBlockElems - 1) / kBlockElems, NG = N * G;
  float* part = workspace;               // NG * nb * 3
  float* scale = part + NG * nb * 3;     // N * C
  float* shift = scale + N * C;          // N * C
  gn_stats_partial<T><<<dim3(nb, NG), kThreads, 0, stream>>>(x, C, S, G, channels_last, nb, part);
  gn_stats_finalize<<<grid_for(NG), kThreads, 0, stream>>>(part, NG, nb, eps, mean, rstd);
  gn_scale_shift<<<grid_for(N * C), kThreads, 0, stream>>>(mean, rstd, w, b, N, C, G, scale, shift, nullptr);
  const int64_t total = N * C * S;
  constexpr int VEC = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(y) % 16 == 0);
  const bool vec_ok = aligned && (channels_last ? C % VEC == 0 : S % VEC == 0);
  if (vec_ok) {
    if (silu) gn_apply<T, VEC, true><<<grid_for(total / VEC), kThreads, 0, stream>>>(x, y, total, C, S, channels_last, scale, shift);
    else gn_apply<T, VEC, false><<<grid_for(total / VEC), kThreads, 0, stream>>>(x, y, total, C, S, channels_last, scale, shift);
  } else {
    if (silu) gn_apply<T, 1, true><<<grid_for(total), kThreads, 0, stream>>>(x, y, total, C, S, channels_last, scale, shift);
    else gn_apply<T, 1, false><<<grid_for(total), kThreads, 0, stream>>>(x, y, total, C, S, channels_last, scale, shift);
  }
}

template <typename T>
void backward_impl(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last,
                   const float* mean, const float* rstd, const float* w, const float* b, bool silu, float* dweight,
                   float* dbias, float* workspace, cudaStream_t stream) {
  const int64_t nb = (S + kBlockElems - 1) / kBlockElems, NC = N * C;
  float* scale = workspace;
  float* shift = scale + NC;
  float* cmean = shift + NC;
  float* pa = cmean + NC;        // NC * nb
  float* pb = pa + NC * nb;      // NC * nb
  float* A = pb + NC * nb;
  float* B = A + NC;
  float* alpha = B + NC;
  float* k1 = alpha + NC;
  float* k0 = k1 + NC;
  gn_scale_shift<<<grid_for(NC), kThreads, 0, stream>>>(mean, rstd, w, b, N, C, G, scale, shift, cmean);
  if (silu) gn_bwd_partial<T, true><<<dim3(nb, NC), kThreads, 0, stream>>>(dy, x, C, S, channels_last, nb, scale, shift, cmean, pa, pb);
  else gn_bwd_partial<T, false><<<dim3(nb, NC), kThreads, 0, stream>>>(dy, x, C, S, channels_last, nb, scale, shift, cmean, pa, pb);
  gn_bwd_finalize<<<grid_for(N * G), kThreads, 0, stream>>>(pa, pb, nb, rstd, w, N, C, G, S, A, B, alpha, k1, k0);
  gn_bwd_params<<<grid_for(C), kThreads, 0, stream>>>(A, B, rstd, N, C, G, dweight, dbias);
  if (dx == nullptr) return;
  const int64_t total = NC * S;
  if (silu) gn_bwd_dx<T, true><<<grid_for(total), kThreads, 0, stream>>>(dy, x, dx, total, C, S, channels_last, scale, shift, cmean, alpha, k1, k0);
  else gn_bwd_dx<T, false><<<grid_for(total), kThreads, 0, stream>>>(dy, x, dx, total, C, S, channels_last, scale, shift, cmean, alpha, k1, k0);
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (the host side dispatches by macro and passes the code).
// Workspace sizes in floats: forward N*G*ceil(C/G*S / 16384)*3 + 2*N*C; backward
// N*C*(8 + 2*ceil(S / 16384)).
int64_t group_norm_forward_workspace(int64_t N, int64_t C, int64_t S, int64_t G) {
  const int64_t D = (C / G) * S;
  return N * G * ((D + kBlockElems - 1) / kBlockElems) * 3 + 2 * N * C;
}

int64_t group_norm_backward_workspace(int64_t N, int64_t C, int64_t S) {
  return N * C * (8 + 2 * ((S + kBlockElems - 1) / kBlockElems));
}

void group_norm_forward(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S, int64_t G,
                        bool channels_last, float eps, const float* w, const float* b, bool silu, float* mean,
                        float* rstd, float* workspace, cudaStream_t stream) {
  switch (dtype) {
    case 1:
      forward_impl(static_cast<const __half*>(x), static_cast<__half*>(y), N, C, S, G, channels_last, eps, w, b, silu,
                   mean, rstd, workspace, stream);
      break;
    case 2:
      forward_impl(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), N, C, S, G, channels_last,
                   eps, w, b, silu, mean, rstd, workspace, stream);
      break;
    default:
      forward_impl(static_cast<const float*>(x), static_cast<float*>(y), N, C, S, G, channels_last, eps, w, b, silu,
                   mean, rstd, workspace, stream);
  }
}

void group_norm_backward(int dtype, const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t S,
                         int64_t G, bool channels_last, const float* mean, const float* rstd, const float* w,
                         const float* b, bool silu, float* dweight, float* dbias, float* workspace,
                         cudaStream_t stream) {
  switch (dtype) {
    case 1:
      backward_impl(static_cast<const __half*>(dy), static_cast<const __half*>(x), static_cast<__half*>(dx), N, C, S,
                    G, channels_last, mean, rstd, w, b, silu, dweight, dbias, workspace, stream);
      break;
    case 2:
      backward_impl(static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x),
                    static_cast<__nv_bfloat16*>(dx), N, C, S, G, channels_last, mean, rstd, w, b, silu, dweight,
                    dbias, workspace, stream);
      break;
    default:
      backward_impl(static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<float*>(dx), N, C, S, G,
                    channels_last, mean, rstd, w, b, silu, dweight, dbias, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace osp
