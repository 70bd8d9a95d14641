// osp._C: the schemas of every op (declared once, namespace osp_C), their CPU implementations, and
// the run-time choice of the CPU ISA level. Autograd and fake (meta) implementations are registered
// from Python (osp/ops/_ext.py) with torch.library.register_autograd / register_fake.
#include <torch/library.h>

#include <cstdlib>
#include <mutex>

#include "cpu_isa.h"
#include "dispatch.h"
#include "group_norm/group_norm.h"
#include "modulation/modulation.h"
#include "tile_blend/tile_blend.h"

namespace osp {

bool& poison_outputs() {
  static bool on = false;
  return on;
}

namespace {

bool set_poison_outputs(bool on) {
  const bool before = poison_outputs();
  poison_outputs() = on;
  return before;
}

}  // namespace

namespace cpu {
namespace {

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case Isa::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case Isa::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return isa == Isa::DEFAULT;
#endif
}

std::vector<Isa> built_isas() {
  std::vector<Isa> out{Isa::DEFAULT};
#if defined(OSP_ISA_AVX2)
  out.push_back(Isa::AVX2);
#endif
#if defined(OSP_ISA_AVX512)
  out.push_back(Isa::AVX512);
#endif
  return out;
}

std::mutex isa_mutex;
Isa current = Isa::DEFAULT;
bool chosen = false;

Isa parse(const std::string& name) {
  for (Isa isa : {Isa::DEFAULT, Isa::AVX2, Isa::AVX512}) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK(false, "osp_C: unknown CPU ISA level '", name, "'; expected default, avx2 or avx512");
  return Isa::DEFAULT;
}

std::string names(const std::vector<Isa>& isas) {
  std::string out;
  for (Isa isa : isas) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

// Callers hold isa_mutex.
std::string select_locked(const std::string& name) {
  const std::vector<Isa> usable = usable_isas();
  if (name.empty()) {
    current = usable.back();
  } else {
    const Isa want = parse(name);
    bool ok = false;
    for (Isa isa : usable) ok = ok || isa == want;
    TORCH_CHECK(ok, "osp_C: CPU ISA level '", name, "' is not usable here; built and supported by this CPU: ",
                names(usable));
    current = want;
  }
  chosen = true;
  return isa_name(current);
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      return "avx512";
    case Isa::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

std::vector<Isa> usable_isas() {
  std::vector<Isa> out;
  for (Isa isa : built_isas()) {
    if (cpu_supports(isa)) out.push_back(isa);
  }
  return out;
}

Isa active_isa() {
  std::lock_guard<std::mutex> lock(isa_mutex);
  if (!chosen) {
    const char* env = std::getenv("OSP_CPU_ISA");
    select_locked(env ? env : "");
  }
  return current;
}

std::string set_cpu_isa(const std::string& name) {
  std::lock_guard<std::mutex> lock(isa_mutex);
  return select_locked(name);
}

namespace {

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (Isa isa : usable_isas()) out.emplace_back(isa_name(isa));
  return out;
}

std::string cpu_isa() { return isa_name(active_isa()); }

}  // namespace
}  // namespace cpu
}  // namespace osp

TORCH_LIBRARY(osp_C, m) {
  // GroupNorm with an optional fused SiLU. Returns y (x's layout), mean and rstd (N, G) float32.
  m.def("group_norm_act(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu) "
        "-> (Tensor, Tensor, Tensor)");
  // Its gradients: dx (empty when not compute_dx), dweight and dbias (C,) float32.
  m.def("group_norm_act_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int num_groups, bool silu, bool compute_dx) -> (Tensor, Tensor, Tensor)");
  // In place, for inference (no autograd: torch refuses it on a mutating op).
  m.def("group_norm_act_(Tensor(a!) x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu) -> ()");
  // Tiled decoding: out[region] += tile * ramps, wsum[region] += ramps; then out /= wsum.
  m.def("blend_tile_(Tensor(a!) out, Tensor(b!) wsum, Tensor tile, int[3] offset, int[3] overlap_lo, "
        "int[3] overlap_hi) -> ()");
  m.def("blend_normalize_(Tensor(a!) out, Tensor wsum) -> ()");
  // The DiT's adaLN: LayerNorm(x) * (1 + scale) + shift over (B, L, D) tokens, shift/scale (Bm, D)
  // with Bm in {1, B} (each its own). Returns y, mean and rstd (B, L) float32; the backward dx and the per-batch-entry
  // dshift, dscale (B, D) float32.
  m.def("layer_norm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_modulate_backward(Tensor dy, Tensor x, Tensor scale, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  // The adaLN gate: x + gate * y, one dtype, gate (Bg, D) with Bg in {1, B}. The backward returns dy and
  // the per-batch-entry dgate (B, D) float32 (dx is dout).
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_backward(Tensor dout, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  // CPU ISA level: the usable ones (built and supported by this CPU), the active one, and a setter
  // ("" = automatic) returning the level now active.
  m.def("cpu_isas() -> str[]", &osp::cpu::cpu_isas);
  m.def("cpu_isa() -> str", &osp::cpu::cpu_isa);
  m.def("set_cpu_isa(str name) -> str", &osp::cpu::set_cpu_isa);
  // Tests: fill every output the host functions allocate with NaN first; returns the previous setting.
  m.def("set_poison_outputs(bool on) -> bool", &osp::set_poison_outputs);
}

TORCH_LIBRARY_IMPL(osp_C, CPU, m) {
  m.impl("group_norm_act", &osp::group_norm_act_cpu);
  m.impl("group_norm_act_backward", &osp::group_norm_act_backward_cpu);
  m.impl("group_norm_act_", &osp::group_norm_act_inplace_cpu);
  m.impl("blend_tile_", &osp::blend_tile_cpu);
  m.impl("blend_normalize_", &osp::blend_normalize_cpu);
  m.impl("layer_norm_modulate", &osp::layer_norm_modulate_cpu);
  m.impl("layer_norm_modulate_backward", &osp::layer_norm_modulate_backward_cpu);
  m.impl("gated_residual", &osp::gated_residual_cpu);
  m.impl("gated_residual_backward", &osp::gated_residual_backward_cpu);
}
