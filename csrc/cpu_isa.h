// CPU instruction-set levels of the osp._C kernels.
//
// Each *_cpu_kernel.cpp is compiled once per level (setup.py: OSP_CPU_ISAS), with
// -DCPU_CAPABILITY=<LEVEL> so that at::vec::Vectorized and our kernels land in a namespace of
// their own (no ODR clash between levels). The level is chosen at run time from the CPU's
// capabilities (never -march=native); OSP_CPU_ISA, or osp_C::set_cpu_isa, forces one.
#pragma once

#include <string>
#include <vector>

namespace osp {
namespace cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

const char* isa_name(Isa isa);
// Levels compiled into this library and supported by this CPU, lowest first.
std::vector<Isa> usable_isas();
// The level kernels run at now.
Isa active_isa();
// "" = automatic (the best usable level, or OSP_CPU_ISA when set); else "default", "avx2", "avx512".
// Returns the active level's name; an unknown, unbuilt or unsupported level is an error.
std::string set_cpu_isa(const std::string& name);

}  // namespace cpu
}  // namespace osp

// Declares a kernel function of every built level: DECLARE_ISA_FN(ret, name, args) declares
// osp::cpu::<LEVEL>::name and ISA_CALL(name, ...) calls the active level's.
#define OSP_DECLARE_ONE(level, ret, name, ...) \
  namespace osp { namespace cpu { namespace level { ret name(__VA_ARGS__); } } }

#if defined(OSP_ISA_AVX512)
#define OSP_IF_AVX512(...) __VA_ARGS__
#else
#define OSP_IF_AVX512(...)
#endif
#if defined(OSP_ISA_AVX2)
#define OSP_IF_AVX2(...) __VA_ARGS__
#else
#define OSP_IF_AVX2(...)
#endif

#define DECLARE_ISA_FN(ret, name, ...)                   \
  OSP_DECLARE_ONE(DEFAULT, ret, name, __VA_ARGS__)       \
  OSP_IF_AVX2(OSP_DECLARE_ONE(AVX2, ret, name, __VA_ARGS__)) \
  OSP_IF_AVX512(OSP_DECLARE_ONE(AVX512, ret, name, __VA_ARGS__))

#define ISA_CALL(name, ...)                                                              \
  [&]() {                                                                                \
    switch (::osp::cpu::active_isa()) {                                                  \
      OSP_IF_AVX512(case ::osp::cpu::Isa::AVX512: return ::osp::cpu::AVX512::name(__VA_ARGS__);) \
      OSP_IF_AVX2(case ::osp::cpu::Isa::AVX2: return ::osp::cpu::AVX2::name(__VA_ARGS__);)       \
      default: return ::osp::cpu::DEFAULT::name(__VA_ARGS__);                            \
    }                                                                                    \
  }()
