"""Text-to-video sampling: one classifier-free-guidance denoising step, and a whole sample with its
decode, osp against an upstream-style path on the same weights and inputs.

Op "t2v_cfg_step": one denoising step as the pipeline runs it with guidance, one batched forward of
batch 2 (unconditional + conditional), captions as upstream passes them at inference (one prompt:
both branches truncated to the caption's k tokens, no mask). Rows:

- backend "auto": osp.models.LatteT2V with osp's dispatch; "torch": every osp op forced to its
  torch backend (osp's model structure alone); "triton" on CPU only under TRITON_INTERPRET=1 (it
  checks that the kernels run, not speed);

each against diffusers' LatteTransformer3DModel, the module-for-module twin of upstream's LatteT2V
(bench_latte's construction and FLOP count; SDPA, no mask), in the same run. GPU: LatteT2V-XL/122 in
bf16 at 17x256x256 (latents 5x32x32) and 65x256x256 (17x32x32), k = 120 tokens. CPU: a small model
(2 layers, 4 x 32) in fp32 at 9x64x64 (latents 3x8x8), k = 24.

Op "t2v_sample": prompt to uint8 video, the decode included, both sides with the same scheduler
(upstream's default, PNDM, with its 0.27.2 configuration: 50 steps are 59 model calls), guidance
7.5, initial noise and prompt:

- osp: TextToVideoPipeline (text_mask="upstream") with the VAE's tiled decode on as ``osp sample``
  turns it on (mode osp-v1.0, 256 px tiles, overlap 0.25). Backend "auto, T5 offloaded": the text
  encoder waits on the CPU and visits the GPU for each prompt (offload_text_encoder=True, the
  target's setting; the time includes its transfers); "auto, T5 resident": it stays on the GPU.
- upstream-style (written here after upstream's VideoGenPipeline, spec B.3-B.5): the encoder
  resident on the device, the same scheduler loop over the twin transformer, and upstream's VAE
  decode (bench_vae's upstream-style convs and norms; upstream does not tile at these sizes, its
  tiling starts above 32 latents).

Text encoder: no download. GPU: osp's TinyTextEncoder at T5-v1.1-XXL's size (width 4096, 24
layers, 64 heads: 4.85B parameters, 9.7 GB in bf16, against T5-XXL encoder's 4.76B), random
weights, so that offloading moves what it would move; its byte-level tokens make a 119-character
prompt k = 120 tokens. CPU: the built-in TinyTextEncoder (and offloading moves nothing).
Random weights throughout (timing does not depend on them).

Peak memory (row "data" and note): GPU, each side's resident device weights plus the CUDA
allocator's peak above what was allocated before one call (max_memory_allocated), i.e. the peak
that side alone would show; CPU, the peak RSS rise of one call in a fresh process (``python -m
bench.bench_sampling --peak osp|upstream``), weights excluded. A warm call then an instrumented one
split each side's time into text encoding, denoising and decode, and give the two videos' largest
uint8 difference (same weights: near zero on CPU fp32; bf16 drifts over the steps).

FLOPs: the transformer's useful work (bench_latte.forward_flops) per model call; the sample rows
count every call and nothing else (text encoder and decode excluded). Bytes: the transformer's
weights read once per call.

diffusers is imported lazily: without it (a GPU machine without the carried wheel,
bench/fetch_wheels.sh) every case is a "skipped" row naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.metadata
import inspect
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import osp

from . import bench_vae
from .harness import INTERPRETER_NOTE, Case, peak_cuda_mib, peak_rss_in_subprocess

BATCH = 2  # classifier-free guidance: unconditional + conditional in one forward
GUIDANCE = 7.5
SCHEDULER = "PNDM"  # upstream's default --sample_method

# CPU model: LatteT2V-XL/122's layout, small widths (latents of 9x64x64 clips).
CPU_TRANSFORMER = dict(num_layers=2, num_attention_heads=4, attention_head_dim=32, caption_channels=64,
                       sample_size=8, video_length=3)
GPU_STEPS = [dict(name="LatteT2V-XL/122", preset="LatteT2V-XL/122", clip="17x256x256", frames=5, size=32, k=120),
             dict(name="LatteT2V-XL/122", preset="LatteT2V-XL/122-65x256x256", clip="65x256x256", frames=17, size=32,
                  k=120)]
CPU_STEPS = [dict(name="LatteT2V small (2 layers, 4x32)", preset="LatteT2V-XL/122", overrides=CPU_TRANSFORMER,
                  clip="9x64x64", frames=3, size=8, k=24)]
# End to end: the first step configuration's model, the VAE of bench_vae, a text encoder.
GPU_SAMPLE = dict(steps=50, vae=bench_vae.GPU,
                  encoder=dict(out_channels=4096, width=4096, layers=24, heads=64),
                  encoder_name="TinyTextEncoder at T5-v1.1-XXL size (4096 x 24 layers, 4.85B params)")
CPU_SAMPLE = dict(steps=4, vae=bench_vae.CPU, encoder=dict(out_channels=CPU_TRANSFORMER["caption_channels"]),
                  encoder_name="TinyTextEncoder (built-in, 2 layers x 64)")
TILING = dict(mode="osp-v1.0", tile_sample_size=256, overlap=0.25)  # osp sample --enable_tiling's defaults
UPSTREAM_MAX_LENGTH = 300
STEP_BASELINE = "diffusers LatteTransformer3DModel (upstream twin, SDPA, no mask)"
SAMPLE_BASELINE = "upstream-style VideoGenPipeline: T5 resident, twin transformer, upstream VAE decode"
_WORDS = ("a red panda climbs a mossy tree in a quiet bamboo forest at dawn while soft light falls through the "
          "leaves and mist drifts over the river below the hills ")


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def prompt_of(k: int) -> str:
    """A caption of k tokens for the byte-level TinyTextEncoder (k - 1 characters and the end token),
    made of lower-case words that upstream's caption cleaning leaves as they are."""
    text = (_WORDS * (k // len(_WORDS) + 2))[: k - 1]
    return text[:-1] + "s" if text.endswith(" ") else text


def _missing_diffusers() -> Optional[str]:
    """Why diffusers cannot be used here (imported now, never at module import), or None."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return (f"diffusers cannot be imported ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "osp's models and the upstream twin need it (GPU machine: bench/fetch_wheels.sh here, then carry .whl)")
    return None


def _resident_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` that sit on a CUDA device (shared tensors once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_cuda and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# --- one CFG denoising step -------------------------------------------------------------------------------


def _transformer(spec: Dict, device: str, dtype: torch.dtype):
    from osp.models import LatteT2V

    torch.manual_seed(0)
    with torch.device(device):
        model = LatteT2V.from_preset(spec["preset"], **spec.get("overrides", {}))
    return model.to(dtype).eval()


def _step_case_list(spec: Dict, device: str, model, twin) -> List[Case]:
    from .bench_latte import forward_flops

    cuda = device.startswith("cuda")
    dtype = _dtype(device)
    cfg = dict(model.config)
    F_, S, k = spec["frames"], spec["size"], spec["k"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(BATCH, cfg["in_channels"], F_, S, S, generator=g).to(device, dtype)
    t = torch.full((BATCH,), 500, dtype=torch.long, device=device)  # one timestep for both branches
    ehs = torch.randn(BATCH, k, cfg["caption_channels"], generator=g).to(device, dtype)

    def upstream():
        with torch.no_grad():
            return twin(x, t, ehs, None, enable_temporal_attentions=True, return_dict=False)[0]

    def ours(backend: Optional[str]) -> Callable[[], torch.Tensor]:
        def run():
            ctx = osp.ops.use_backend(backend) if backend else contextlib.nullcontext()
            with ctx, torch.no_grad():  # the pipeline's call
                return model(x, t, ehs, encoder_attention_mask=None, enable_temporal_attentions=True,
                             return_dict=False)[0]
        return run

    ref = upstream().float()
    base_peak = peak_cuda_mib(upstream) if cuda else None
    backends = ["auto", "torch"] + (["triton"] if not cuda and os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = []
    for be in backends:
        run = ours(None if be == "auto" else be)
        data: Dict[str, object] = {"k": k, "diffusers": importlib.metadata.version("diffusers")}
        note = ""
        if be == "triton":
            note = INTERPRETER_NOTE
        else:
            y = run().float()
            data["max_abs_diff_vs_twin"] = float((y - ref).abs().max())
            data["ref_abs_max"] = float(ref.abs().max())
            if cuda:
                peak = peak_cuda_mib(run)
                data.update(peak_mib=peak, twin_peak_mib=base_peak)
                note = f"peak above weights MiB: osp {peak:.0f}, twin {base_peak:.0f}"
        out.append(Case(
            op="t2v_cfg_step", shape=f"{spec['name']} {spec['clip']} b{BATCH} k{k}", dtype=_dtype_name(dtype),
            layout="bcfhw", backend=be, mode="fwd (CFG)", run=run, baseline=upstream, baseline_name=STEP_BASELINE,
            bytes=weight_bytes, flops=forward_flops(cfg, BATCH, F_, S, S, k), note=note, data=data))
    return out


# --- end-to-end sampling --------------------------------------------------------------------------------


class _Phases:
    """Wall time of named phases of one call (synchronized), only while ``on``."""

    def __init__(self, device):
        self.device, self.on, self.ms = device, False, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.on:
            yield
            return
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def _instrument(pipe, phases: _Phases) -> None:
    """Time the pipeline's prompt encoding and decode (its public steps) through ``phases``."""
    for name, label in (("encode_prompt", "text"), ("decode_latents", "decode")):
        fn = getattr(pipe, name)

        def wrapped(*args, _fn=fn, _label=label, **kwargs):
            with phases(_label):
                return _fn(*args, **kwargs)
        setattr(pipe, name, wrapped)


def _upstream_sample(twin, vae, encoder, scheduler, prompt: str, noise: torch.Tensor, steps: int,
                     guidance: float, phases: _Phases) -> torch.Tensor:
    """Upstream's VideoGenPipeline.__call__ for one prompt (spec B.3-B.5): the encoder resident on the
    device, T5-length encoding truncated to the caption's k tokens (the negative's first k states, pads
    included), no mask, CFG on every channel, the learned-sigma split, upstream's decode, uint8
    truncation."""
    from osp.pipelines import preprocess_captions

    device = noise.device
    with torch.no_grad():
        with phases("text"):
            pos, mask = encoder.encode(preprocess_captions([prompt]), max_length=UPSTREAM_MAX_LENGTH, raw=True)
            neg, _ = encoder.encode(preprocess_captions([""]), max_length=UPSTREAM_MAX_LENGTH, raw=True)
            k = int(mask.sum().item())
            states = torch.cat([neg[:, :k], pos[:, :k]]).to(device)
        with phases("denoise"):
            scheduler.set_timesteps(steps, device=device)
            params = set(inspect.signature(scheduler.step).parameters)
            extra = {"eta": 0.0} if "eta" in params else {}
            latents = noise * scheduler.init_noise_sigma
            C = latents.shape[1]
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                tt = t[None].to(device) if torch.is_tensor(t) else torch.tensor([t], device=device)
                out = twin(x, tt.expand(x.shape[0]), states, None, enable_temporal_attentions=True,
                           return_dict=False)[0]
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
                if twin.config.out_channels // 2 == C:
                    out = out.chunk(2, dim=1)[0]
                latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
        with phases("decode"), bench_vae.upstream_style():
            video = vae.decode(latents / vae.config.scaling_factor).sample
            # upstream computes this in the VAE's dtype (fp16); like the pipeline, fp32 for other dtypes
            video = video.to(torch.float16 if video.dtype == torch.float16 else torch.float32)
            return ((video / 2.0 + 0.5).clamp(0, 1) * 255).to(torch.uint8).cpu().permute(0, 2, 3, 4, 1).contiguous()


@dataclass
class Sampling:
    """Everything both sides of the end-to-end case need, built once (same weights, noise, prompt)."""

    device: str
    spec: Dict
    sample: Dict
    model: object
    twin: object
    vae: object  # osp's, tiled
    vae_up: object  # upstream-style, untiled
    encoder_up: object  # resident on the device
    pipes: Dict[str, object]  # row backend -> TextToVideoPipeline
    scheduler_up: object
    noise: torch.Tensor
    prompt: str
    phases: _Phases

    def run_osp(self, name: str) -> Callable[[], torch.Tensor]:
        pipe = self.pipes[name]

        def run():
            return pipe(self.prompt, num_inference_steps=self.sample["steps"], guidance_scale=GUIDANCE,
                        latents=self.noise, output_type="uint8", text_mask="upstream", progress=False).video
        return run

    def run_upstream(self) -> torch.Tensor:
        return _upstream_sample(self.twin, self.vae_up, self.encoder_up, self.scheduler_up, self.prompt, self.noise,
                                self.sample["steps"], GUIDANCE, self.phases)

    def side_modules(self, name: str):
        if name == "upstream":
            return [self.twin, self.vae_up, self.encoder_up]
        pipe = self.pipes[name]
        return [pipe.transformer, pipe.vae, pipe.text_encoder]


def _encoder(sample: Dict, device: str, dtype: torch.dtype):
    from osp.models import TinyTextEncoder

    with torch.device(device):
        enc = TinyTextEncoder(**sample["encoder"])
    return enc.to(dtype)


def build_sampling(device: str, model=None, twin=None, sides=("osp", "upstream")) -> Sampling:
    """The end-to-end components (``model``/``twin``: the step case's, reused when given); ``sides``
    limits what is built (a fresh process measuring one side's memory)."""
    from osp.pipelines import TextToVideoPipeline, make_scheduler

    from .bench_latte import _twin

    cuda = device.startswith("cuda")
    spec, sample = (GPU_STEPS if cuda else CPU_STEPS)[0], GPU_SAMPLE if cuda else CPU_SAMPLE
    dtype = _dtype(device)
    model = model if model is not None else _transformer(spec, device, dtype)
    if "upstream" in sides and twin is None:
        twin = _twin(model).eval()
    built = bench_vae._model(dict(sample["vae"], dtype=dtype), device)  # seeded: the same weights both sides
    vae = vae_up = None
    if "upstream" in sides:
        vae_up = copy.deepcopy(built) if "osp" in sides else built
    if "osp" in sides:
        vae = built
        vae.enable_tiling(**TILING, progress=False)
    encoder_up = _encoder(sample, device, dtype) if "upstream" in sides or not cuda else None
    pipes = {}
    if "osp" in sides:
        if cuda:
            pipes["auto, T5 offloaded"] = TextToVideoPipeline(vae, model, _encoder(sample, device, dtype),
                                                              make_scheduler(SCHEDULER), offload_text_encoder=True)
            if encoder_up is not None:
                pipes["auto, T5 resident"] = TextToVideoPipeline(vae, model, encoder_up, make_scheduler(SCHEDULER))
        else:  # offloading to the CPU from the CPU moves nothing
            pipes["auto"] = TextToVideoPipeline(vae, model, encoder_up, make_scheduler(SCHEDULER),
                                                offload_text_encoder=True)
    phases = _Phases(device)
    for pipe in pipes.values():
        _instrument(pipe, phases)
    C, F_, S = model.config.in_channels, spec["frames"], spec["size"]
    noise = torch.randn(1, C, F_, S, S, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    return Sampling(device, spec, sample, model, twin, vae, vae_up, encoder_up, pipes, make_scheduler(SCHEDULER),
                    noise, prompt_of(spec["k"]), phases)


def _measure(s: Sampling, name: str) -> Tuple[torch.Tensor, Dict[str, float]]:
    """One warm call, then one instrumented call: its video, phase times and (CUDA) peak memory."""
    fn = s.run_upstream if name == "upstream" else s.run_osp(name)
    fn()
    cuda = s.device.startswith("cuda")
    resident = _resident_bytes(s.side_modules(name)) if cuda else 0
    s.phases.ms = {}
    s.phases.on = True
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        video = fn()
        _sync(s.device)
        total = (time.perf_counter() - t0) * 1e3
    finally:
        s.phases.on = False
    ms = dict(s.phases.ms)
    if name != "upstream":  # the pipeline's denoising is what its encode and decode leave
        ms["denoise"] = total - ms.get("text", 0.0) - ms.get("decode", 0.0)
    out = {"ms": total, **{f"{k}_ms": v for k, v in ms.items()}}
    if cuda:
        call = (torch.cuda.max_memory_allocated() - base) / 2**20
        out.update(resident_mib=resident / 2**20, call_peak_mib=call, peak_mib=resident / 2**20 + call)
    return video, out


def _model_calls(steps: int) -> int:
    from osp.pipelines import make_scheduler

    sched = make_scheduler(SCHEDULER)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def _sample_cases(device: str, model, twin) -> List[Case]:
    from .bench_latte import forward_flops

    cuda = device.startswith("cuda")
    s = build_sampling(device, model, twin)
    spec, sample = s.spec, s.sample
    from osp.pipelines import preprocess_captions

    k = int(s.encoder_up.tokenize(preprocess_captions([s.prompt]))[1].sum())  # the caption's tokens, as encoded
    calls = _model_calls(sample["steps"])
    cfg = dict(s.model.config)
    flops = calls * forward_flops(cfg, BATCH, spec["frames"], spec["size"], spec["size"], k)
    nbytes = calls * sum(p.numel() * p.element_size() for p in s.model.parameters())

    ref, up = _measure(s, "upstream")
    if not cuda:
        try:
            up["peak_mib"] = peak_rss_in_subprocess("bench.bench_sampling", "upstream", str(torch.get_num_threads()))
        except Exception as exc:  # no peak rather than no row
            up["peak_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    shape = f"{spec['name']} {spec['clip']} {SCHEDULER}{sample['steps']} k{k}"
    out = []
    for name in s.pipes:
        video, ours = _measure(s, name)
        if not cuda:
            try:
                ours["peak_mib"] = peak_rss_in_subprocess("bench.bench_sampling", "osp", str(torch.get_num_threads()))
            except Exception as exc:
                ours["peak_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        diff = (video.int() - ref.int()).abs()
        data: Dict[str, object] = {
            "osp": ours, "upstream": up, "steps": sample["steps"], "model_calls": calls, "scheduler": SCHEDULER,
            "guidance": GUIDANCE, "k": k, "tiling": TILING, "text_encoder": sample["encoder_name"],
            "offload_text_encoder": s.pipes[name].offload_text_encoder, "video": list(video.shape),
            "video_max_abs_diff": int(diff.max()), "video_mean_abs_diff": float(diff.float().mean()),
            "diffusers": importlib.metadata.version("diffusers"),
        }
        what = "peak (weights + call)" if cuda else "peak RSS rise of one call, fresh process"
        if "peak_mib" in ours and "peak_mib" in up:
            data["peak_ratio"] = ours["peak_mib"] / up["peak_mib"]
            mem = f"{what} MiB: osp {ours['peak_mib']:.0f} vs upstream-style {up['peak_mib']:.0f} " \
                  f"({data['peak_ratio']:.2f}x)"
        else:
            mem = f"{what}: not measured ({ours.get('peak_error') or up.get('peak_error')})"
        split = "/".join(f"{ours.get(p + '_ms', 0):.0f}" for p in ("text", "denoise", "decode"))
        split_up = "/".join(f"{up.get(p + '_ms', 0):.0f}" for p in ("text", "denoise", "decode"))
        note = (f"{mem}; text/denoise/decode ms osp {split}, upstream-style {split_up}; {calls} model calls; "
                f"video max abs diff {int(diff.max())}")
        out.append(Case(
            op="t2v_sample", shape=shape, dtype=_dtype_name(_dtype(device)), layout="b t h w 3 uint8", backend=name,
            mode="e2e + decode", run=s.run_osp(name), baseline=s.run_upstream, baseline_name=SAMPLE_BASELINE,
            bytes=nbytes, flops=flops, note=note, data=data))
    return out


# --- the suite ---------------------------------------------------------------------------------------------


def _skipped(device: str, reason: str) -> List[Case]:
    cuda = device.startswith("cuda")
    dtype = _dtype_name(_dtype(device))
    cases = []
    for spec in GPU_STEPS if cuda else CPU_STEPS:
        for be in ("auto", "torch"):
            cases.append(Case(op="t2v_cfg_step", shape=f"{spec['name']} {spec['clip']} b{BATCH} k{spec['k']}",
                              dtype=dtype, layout="bcfhw", backend=be, mode="fwd (CFG)", run=lambda: None,
                              baseline=None, baseline_name=STEP_BASELINE, bytes=0, skip=reason))
    spec, sample = (GPU_STEPS if cuda else CPU_STEPS)[0], GPU_SAMPLE if cuda else CPU_SAMPLE
    for name in (("auto, T5 offloaded", "auto, T5 resident") if cuda else ("auto",)):
        cases.append(Case(op="t2v_sample", shape=f"{spec['name']} {spec['clip']} {SCHEDULER}{sample['steps']}",
                          dtype=dtype, layout="b t h w 3 uint8", backend=name, mode="e2e + decode", run=lambda: None,
                          baseline=None, baseline_name=SAMPLE_BASELINE, bytes=0, skip=reason))
    return cases


def cases(device: str, quick: bool) -> List[Case]:
    """Step rows for each configuration (quick: the first), then the end-to-end rows."""
    reason = _missing_diffusers()
    if reason:
        return _skipped(device, reason)
    from .bench_latte import _twin

    cuda = device.startswith("cuda")
    specs = (GPU_STEPS if cuda else CPU_STEPS)[: 1 if quick else None]
    out: List[Case] = []
    first = None
    for spec in specs:
        model = _transformer(spec, device, _dtype(device))
        twin = _twin(model).eval()
        out += _step_case_list(spec, device, model, twin)
        first = first or (model, twin)
        gc.collect()
    out += _sample_cases(device, *first)
    return out


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a call reusing them still raises the RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_main(side: str, threads: int) -> None:
    from osp.testing.memory import print_peak

    torch.set_num_threads(threads)
    s = build_sampling("cpu", sides=(side,))
    fn = s.run_upstream if side == "upstream" else s.run_osp("auto")
    _release_freed_memory()
    print_peak(fn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", nargs=2, metavar=("SIDE", "THREADS"), required=True,
                        help="SIDE: osp or upstream; print the peak RSS rise of one CPU call")
    a = parser.parse_args()
    if a.peak[0] not in ("osp", "upstream"):
        parser.error(f"--peak {a.peak[0]}: expected osp or upstream")
    _peak_main(a.peak[0], int(a.peak[1]))
