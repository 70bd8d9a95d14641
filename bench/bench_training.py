"""LatteT2V training: one optimizer step, osp against the upstream-style eager twin, and the data
loader's clips/s from mp4.

Op "latte_t2v_train_step": one whole training step as ``osp train-t2v`` runs it (spec C.3):
``osp.diffusion`` training_losses (t uniform, learned-sigma MSE + VB, the real loss) of a denoiser
that runs the model, backward, gradient clipping at 1.0, AdamW (lr 2e-5, betas 0.9/0.999, weight
decay 0.01, eps 1e-8), zero_grad; gradient checkpointing on both sides (every spatial and temporal
block, use_reentrant=False, as upstream trains); a synchronization at the end of every step (the
training loop reads the loss each step). Joint image-video batches as upstream's stage scripts
(use_img_from_vid: 4 images per clip, each with the clip's caption): latents (b, 4, F + 4, h, w),
captions (b, 1 + 4, L, C) with 0/1 masks (b, 1 + 4, L) of different lengths per sample.

- backend "auto": osp.models.LatteT2V with osp's dispatch (fused Triton / flash attention and
  modulation on GPU);
- baseline: diffusers' LatteTransformer3DModel with the same weights (bench_latte's twin of
  upstream's LatteT2V), run by ``upstream_forward`` below: upstream's joint image-video forward
  (its -10000 additive caption bias, video caption repeated per frame, images with their own rows,
  temp_pos_embed and the temporal blocks on the video frames only), written over the twin's modules
  because diffusers' forward has no use_image_num. Its own AdamW over its own fp32 weights.

GPU: LatteT2V-XL/122, bf16 autocast over fp32 master weights (as osp trains), batch 4 per GPU and 4
images (upstream's stage scripts), T5-length captions (L = 300, bf16 states as T5 gives them):
17x256x256 (latents 5 + 4 frames of 32x32) and 65x256x256 (17 + 4 frames; LatteT2V-XL/122-65x256x256;
upstream's 65-frame script also joins 4 images, spec C.6). Both sides follow osp's recipe (autocast,
clipping), so the rows compare the models alone: upstream's released DeepSpeed run was pure bf16
and did not clip (spec C.1, C.3).
CPU: a tiny LatteT2V (2 layers, 2 heads x 32) in fp32 at 17x64x64 (latents 5 + 4 frames of 8x8),
batch 2, L = 16.

Row fields: ms per step (harness), TFLOP/s (useful FLOPs: 3 x the forward, the checkpointing
recompute not counted; bench_latte.forward_flops for the clips, its 1-frame count less the temporal
blocks and timestep embedding for the images), the twin's ms and the speedup; "data" holds the batch,
samples/s (batch / the median synchronized wall time of the step's timed calls), the loss of the
first step on each side (same weights and inputs) and on GPU each side's peak memory: its resident
weights and AdamW state plus CUDA max_memory_allocated above what was allocated before one step,
i.e. the peak that side alone would show (inputs excluded), and the ratio osp / twin; the note says
the same. Bytes: fp32 weights read by forward and backward and gradients written (3 x 4 B per
parameter), plus AdamW's 7 x 4 B (param, grad, two moments read; param and moments written).

Op "t2v_data_loader": osp.data.VideoCaptionDataset over a synthetic mp4 dataset written to a
temporary folder by osp.data.synthetic (``osp make-data``; H.264, else MPEG-4), with the step's data
settings (17 frames, use_image_num 4 from the clip, flip), through a torch DataLoader as training
builds it (batch 2, the training loop's collate, prefetch_factor 2, pinned memory on GPU) with an
endless osp.data.ResumableSampler order (one epoch after another), for N = 0, 2, 4 workers (those up
to the CPUs this process may use). GPU runs: 17x256x256 clips; CPU: 17x64x64. One timed call pulls
8 x max(1, N) batches from a loader whose workers started in the first (warm-up) call. "data" gets
clips/s (clips per call / the median of the timed calls' wall times) and, when a step row of this run
trains on clips of the same size, the ratio of clips/s to that step's clip rate (its samples/s:
one clip a sample): on GPU the 17x256x256 step, for the target (>= 10x from 4 workers); on CPU the tiny
model's, which says only that the machinery works. Workers whose batches in flight would not fit
in /dev/shm give a skipped row saying so (a 17x256x256 batch of 2 with its images is 63 MiB; a
container's default /dev/shm is 64 MiB).

diffusers is imported lazily: without it (a GPU machine without the carried wheel,
bench/fetch_wheels.sh) the step cases are "skipped" rows naming it; without PyAV or osp.data the
loader cases are skipped rows naming what is missing.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .harness import Case, peak_cuda_mib

# --- configurations ------------------------------------------------------------------------------------

OPTIMIZER = dict(lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)  # upstream's AdamW (spec C.4)
MAX_GRAD_NORM = 1.0
IMAGES = 4  # use_image_num of upstream's 256-pixel stage scripts

GPU_STEPS = [
    dict(name="LatteT2V-XL/122", preset="LatteT2V-XL/122", clip="17x256x256", batch=4, frames=5, images=IMAGES,
         size=32, caption_len=300, valid=(120, 77, 200, 33)),
    dict(name="LatteT2V-XL/122", preset="LatteT2V-XL/122-65x256x256", clip="65x256x256", batch=4, frames=17,
         images=IMAGES, size=32, caption_len=300, valid=(120, 77, 200, 33)),
]
CPU_TRANSFORMER = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, sample_size=8, caption_channels=32)
CPU_STEPS = [
    dict(name="LatteT2V tiny (2 layers, 2x32)", preset="LatteT2V-XL/122", overrides=CPU_TRANSFORMER,
         clip="17x64x64", batch=2, frames=5, images=IMAGES, size=8, caption_len=16, valid=(11, 4)),
]

LOADER_BATCH = 2
WORKERS = (0, 2, 4)
GPU_LOADER = dict(frames=17, size=256, clips=32)
CPU_LOADER = dict(frames=17, size=64, clips=16)
BATCHES_PER_WORKER = 8  # batches one timed call pulls, per worker (at least one): 4x the prefetched ones

STEP_OP, LOADER_OP = "latte_t2v_train_step", "t2v_data_loader"
STEP_MODE = "train step (ckpt)"
STEP_BASELINE = ("upstream-style joint forward over diffusers LatteTransformer3DModel (twin, SDPA, -10000 bias), "
                 "same loss, clip and AdamW")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_diffusers() -> Optional[str]:
    """Why the step cases cannot run here (diffusers, which osp.models and the twin need), or None."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return (f"diffusers cannot be imported ({_first_line(exc)}); osp's models and the upstream twin need it "
                "(GPU machine: bench/fetch_wheels.sh here, then carry .whl)")
    return None


def _missing_loader() -> Optional[str]:
    """Why the loader cases cannot run here (PyAV, osp.data and its synthetic generator), or None."""
    try:
        import av  # noqa: F401
    except ImportError as exc:
        return f"PyAV cannot be imported ({_first_line(exc)}); the mp4 loader needs it (pip install av)"
    try:
        from osp.data import ResumableSampler, VideoCaptionDataset  # noqa: F401
        from osp.data.synthetic import make_dataset  # noqa: F401
    except Exception as exc:  # osp.data may be missing or half-written: a reason, not a crash
        return f"osp.data is not importable ({type(exc).__name__}: {_first_line(exc)})"
    return None


# --- upstream's joint image-video forward over the twin's modules -------------------------------------------


def upstream_forward(twin, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     encoder_attention_mask: Optional[torch.Tensor] = None, use_image_num: int = 0,
                     checkpointing: bool = True) -> torch.Tensor:
    """Upstream LatteT2V.forward in training (spec C.3; its gradient-checkpointing branch), over a
    diffusers LatteTransformer3DModel's modules: (b, C, F + n, H, W) -> (b, C_out, F + n, H, W).

    Captions (b, L, C) with mask (b, L), or (b, 1 + n, L, C) with (b, 1 + n, L): projected once per
    caption, the video's repeated over its F frames and each image's used by its frame (copies, as
    upstream's ``repeat(...).contiguous()``); the mask becomes upstream's -10000 additive bias in the
    model's dtype. Spatial block i over every frame, then temporal block i over the video frames
    only (temp_pos_embed added to them before block 0); each block checkpointed with
    use_reentrant=False when ``checkpointing`` and grad is enabled.
    """
    from torch.utils.checkpoint import checkpoint

    def run(block, *args):
        if checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    n = use_image_num
    b, C, total, H, W = hidden_states.shape
    frames = total - n
    p = twin.config.patch_size
    Hp, Wp = H // p, W // p
    T = Hp * Wp
    x = twin.pos_embed(hidden_states.permute(0, 2, 1, 3, 4).reshape(b * total, C, H, W))
    D = x.shape[-1]
    tau, embedded = twin.adaln_single(timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                      batch_size=b, hidden_dtype=x.dtype)

    ehs = encoder_hidden_states
    mask = encoder_attention_mask
    if ehs.dim() == 3:
        ehs = ehs[:, None]
        mask = None if mask is None else mask[:, None]
    ctx = twin.caption_projection(ehs)  # (b, 1 + n, L, D)
    L = ctx.shape[2]
    ctx = torch.cat([ctx[:, :1].expand(b, frames, L, D), ctx[:, 1:]], 1).reshape(b * total, L, D)
    bias = None
    if mask is not None:
        mask = (1 - mask.to(twin.dtype)) * -10000.0  # (b, 1 + n, L)
        bias = torch.cat([mask[:, :1].expand(b, frames, L), mask[:, 1:]], 1).reshape(b * total, 1, L)
    tau_spatial = tau.repeat_interleave(total, 0)
    tau_temporal = tau.repeat_interleave(T, 0)

    for i, (spatial, temporal) in enumerate(zip(twin.transformer_blocks, twin.temporal_transformer_blocks)):
        x = run(spatial, x, None, ctx, bias, tau_spatial, None, None)
        x = x.reshape(b, total, T, D).permute(0, 2, 1, 3).reshape(b * T, total, D)  # (b t) f d
        video, images = x[:, :frames], x[:, frames:]
        if i == 0:
            video = video + twin.temp_pos_embed.to(video.dtype)
        video = run(temporal, video, None, None, None, tau_temporal, None, None)
        x = torch.cat([video, images], 1) if n else video
        x = x.reshape(b, T, total, D).permute(0, 2, 1, 3).reshape(b * total, T, D)  # (b f) t d

    embedded = embedded.repeat_interleave(total, 0)
    shift, scale = (twin.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    x = twin.norm_out(x) * (1 + scale) + shift
    x = twin.proj_out(x)
    Cout = twin.out_channels
    x = x.reshape(b * total, Hp, Wp, p, p, Cout)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, total, Cout, H, W)
    return x.permute(0, 2, 1, 3, 4)


# --- FLOPs and bytes ------------------------------------------------------------------------------------------


def step_flops(cfg: Dict, b: int, frames: int, images: int, H: int, W: int, L: int) -> int:
    """Useful FLOPs of one training step: 3 x the forward. The forward is bench_latte.forward_flops
    of the b clips (F frames, their captions); each image adds forward_flops of a 1-frame clip with
    its own caption, less the temporal blocks images skip (per token 12 D^2 multiply-adds of
    projections and MLP, and its 1x1 temporal attention) and the timestep embedding its clip has."""
    from .bench_latte import forward_flops

    fwd = forward_flops(cfg, b, frames, H, W, L)
    if images:
        D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        p, layers = cfg["patch_size"], cfg["num_layers"]
        n = b * images
        T = (H // p) * (W // p)
        fwd += forward_flops(cfg, n, 1, H, W, L) - 2 * layers * n * T * (12 * D * D + 2 * D) \
            - 2 * n * (256 * D + 7 * D * D)
    return 3 * fwd


def step_bytes(num_params: int) -> int:
    """fp32 weights read by forward and backward and gradients written, plus AdamW's traffic."""
    return num_params * 4 * (3 + 7)


# --- one training step ----------------------------------------------------------------------------------------


class _Timed:
    """fn with the wall time of every call recorded, synchronized at the end (the training loop reads
    the loss every step); ``rate(per_call)``: per_call / the median of the calls after the first."""

    def __init__(self, fn: Callable[[], object], device: str):
        self.fn, self.device, self.ms = fn, device, []

    def __call__(self):
        t0 = time.perf_counter()
        out = self.fn()
        _sync(self.device)
        self.ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def median_ms(self) -> Optional[float]:
        timed = self.ms[1:]  # the first call compiles, autotunes, starts workers
        return statistics.median(timed) if timed else None

    def rate(self, per_call: float) -> Optional[float]:
        ms = self.median_ms()
        return None if not ms else per_call * 1e3 / ms


@dataclass
class StepSide:
    """One side of the step case: a denoiser (x, t, **model_kwargs) -> fp32 output, its parameters
    and their AdamW; ``step()`` runs one training step and returns the loss (a 0-dim tensor)."""

    name: str
    denoiser: Callable[..., torch.Tensor]
    params: List[torch.Tensor]
    diffusion: object
    inputs: Dict[str, object]
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.params, **OPTIMIZER)

    def step(self) -> torch.Tensor:
        i = self.inputs
        terms = self.diffusion.training_losses(self.denoiser, i["z"], i["t"], i["kwargs"], noise=i["noise"])
        loss = terms["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def resident_bytes(self) -> int:
        """Bytes of the parameters and AdamW state held between steps."""
        tensors = list(self.params) + [v for s in self.optimizer.state.values() for v in s.values()
                                       if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _amp(device: str):
    if str(device).startswith("cuda"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def step_inputs(spec: Dict, cfg: Dict, device: str) -> Dict[str, object]:
    """Latents, noise, timesteps and captions with masks (seeded): the batch after the encoders."""
    b, F_, n, S, L = spec["batch"], spec["frames"], spec["images"], spec["size"], spec["caption_len"]
    g = torch.Generator().manual_seed(1)
    states_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # T5 runs in bf16
    z = torch.randn(b, cfg["in_channels"], F_ + n, S, S, generator=g).to(device)
    noise = torch.randn(z.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    states = torch.randn(b, 1 + n, L, cfg["caption_channels"], generator=g).to(device, states_dtype)
    valid = torch.tensor([spec["valid"][i % len(spec["valid"])] for i in range(b)])
    mask = (torch.arange(L)[None, None] < valid[:, None, None]).expand(b, 1 + n, L).long().to(device)
    if n == 0:
        states, mask = states[:, 0], mask[:, 0]
    return {"z": z, "noise": noise, "t": t,
            "kwargs": {"encoder_hidden_states": states, "encoder_attention_mask": mask, "use_image_num": n}}


def build_sides(spec: Dict, device: str):
    """(osp side, twin side, config): the same initial fp32 weights, checkpointing on, train mode."""
    from osp.diffusion import create_diffusion
    from osp.models import LatteT2V

    from .bench_latte import _twin

    torch.manual_seed(0)
    with torch.device(device):
        model = LatteT2V.from_preset(spec["preset"], **spec.get("overrides", {}))
    model = model.float().train()
    twin = _twin(model).train()
    model.enable_gradient_checkpointing()
    cfg = dict(model.config)
    inputs = step_inputs(spec, cfg, device)
    diffusion = create_diffusion(timestep_respacing="")
    amp = _amp(device)

    def ours(x, t, **kw):
        with amp():
            out = model(x, t, return_dict=False, **kw)[0]
        return out.float()

    def upstream(x, t, encoder_hidden_states=None, encoder_attention_mask=None, use_image_num=0):
        with amp():
            out = upstream_forward(twin, x, t, encoder_hidden_states, encoder_attention_mask, use_image_num)
        return out.float()

    osp_side = StepSide("osp", ours, [p for p in model.parameters() if p.requires_grad], diffusion, inputs)
    twin_side = StepSide("twin", upstream, list(twin.parameters()), diffusion, inputs)
    return osp_side, twin_side, cfg


def _peak_mib(side: StepSide, fn: Callable[[], object]) -> float:
    """The side's resident weights and AdamW state plus the allocator's peak above what was allocated
    before one call of fn (CUDA)."""
    return side.resident_bytes() / 2**20 + peak_cuda_mib(fn)


@dataclass
class StepRate:
    """The clip rate of a timed step (its samples/s: one clip a sample), for the loader rows' ratio."""

    name: str
    clip: str
    batch: int
    timed: _Timed

    def clips_per_s(self) -> Optional[float]:
        return self.timed.rate(self.batch)


def _step_case(spec: Dict, device: str, rates: List[StepRate]) -> Case:
    import importlib.metadata

    cuda = str(device).startswith("cuda")
    ours, twin, cfg = build_sides(spec, device)
    b, F_, n, S, L = spec["batch"], spec["frames"], spec["images"], spec["size"], spec["caption_len"]
    data: Dict[str, object] = {
        "batch": b, "images": n, "caption_len": L, "checkpointing": True, "max_grad_norm": MAX_GRAD_NORM,
        "optimizer": "AdamW " + ", ".join(f"{k}={v}" for k, v in OPTIMIZER.items()),
        "autocast": "bf16" if cuda else None, "diffusers": importlib.metadata.version("diffusers"),
        "samples_per_s": None, "twin_samples_per_s": None,  # filled in as the harness times the two sides
    }
    # The first step of each side from the same weights and inputs (it also compiles and creates AdamW's state).
    data["first_loss"] = {"osp": float(ours.step()), "twin": float(twin.step())}
    note = f"b{b}: samples/s = {b}000 / ms"
    if cuda:
        peak, peak_twin = _peak_mib(ours, ours.step), _peak_mib(twin, twin.step)
        data.update(peak_mib=peak, twin_peak_mib=peak_twin, peak_ratio=peak / peak_twin)
        note += f"; peak MiB (weights + AdamW + step): osp {peak:.0f}, twin {peak_twin:.0f} ({peak / peak_twin:.2f}x)"
    else:
        note += "; peak memory: CUDA only"
    run, baseline = _Timed(ours.step, device), _Timed(twin.step, device)

    def recording(timed: _Timed, key: str) -> Callable[[], object]:
        def call():
            out = timed()
            data[key] = timed.rate(b)
            return out
        return call

    rates.append(StepRate(f"{spec['name']} {spec['clip']}", spec["clip"], b, run))
    return Case(op=STEP_OP, shape=_step_shape(spec),
                dtype="bf16 amp" if cuda else "fp32", layout="bcfhw", backend="auto", mode=STEP_MODE,
                run=recording(run, "samples_per_s"), baseline=recording(baseline, "twin_samples_per_s"),
                baseline_name=STEP_BASELINE, bytes=step_bytes(sum(p.numel() for p in ours.params)),
                flops=step_flops(cfg, b, F_, n, S, S, L), note=note, data=data)


def _step_shape(spec: Dict) -> str:
    return f"{spec['name']} {spec['clip']} b{spec['batch']} +{spec['images']} img L{spec['caption_len']}"


# --- the data loader ------------------------------------------------------------------------------------------


def worker_counts(cpus: Optional[int] = None) -> List[int]:
    """WORKERS up to the CPUs this process may use."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [w for w in WORKERS if w <= cpus]


class _Endless(torch.utils.data.Sampler):
    """ResumableSampler's order, one epoch after another, as (epoch, index) keys."""

    def __init__(self, n: int, seed: int = 0):
        from osp.data import ResumableSampler

        self.sampler = ResumableSampler(n, seed=seed, shuffle=True, drop_last=True, yield_epoch=True)

    def __iter__(self):
        for epoch in itertools.count():
            self.sampler.set_epoch(epoch)
            yield from self.sampler


def _collate():
    """The training loop's collate (osp.train), else the dataset's own (osp.data.collate)."""
    try:
        from osp.train.t2v import collate
    except Exception:
        from osp.data import collate
    return collate


@dataclass
class LoaderData:
    """A synthetic mp4 dataset in a temporary folder (removed with this object) and its dataset."""

    folder: tempfile.TemporaryDirectory
    dataset: object
    codec: str
    spec: Dict


def make_loader_data(spec: Dict) -> LoaderData:
    from osp.data import VideoCaptionDataset
    from osp.data.synthetic import make_dataset

    folder = tempfile.TemporaryDirectory(prefix="osp-bench-training-")
    size = spec["size"]
    for codec in ("h264", "mpeg4"):
        try:
            made = make_dataset(folder.name, num_videos=spec["clips"], num_frames=spec["frames"], size=(size, size),
                                seed=0, codec=codec)
            break
        except ValueError:  # no H.264 encoder in this PyAV build
            if codec == "mpeg4":
                raise
    dataset = VideoCaptionDataset(made["data_path"], num_frames=spec["frames"], max_image_size=size,
                                  use_image_num=IMAGES, use_img_from_vid=True, seed=0)
    return LoaderData(folder, dataset, codec, spec)


class _LoaderState:
    """A loader case's live iterator (started by its first call) and the data source it reads."""

    def __init__(self, source: LoaderData):
        self.source, self.it = source, None  # the source keeps its temporary folder alive


_LIVE_LOADERS: "weakref.WeakSet[_LoaderState]" = weakref.WeakSet()  # started iterators (one runs at a time)


def _item_bytes(spec: Dict) -> int:
    """float32 video and images of one clip."""
    return 4 * 3 * (spec["frames"] + IMAGES) * spec["size"] ** 2


def shm_shortfall(workers: int, batch_bytes: int, path: str = "/dev/shm") -> Optional[str]:
    """Why ``workers`` DataLoader workers would run out of shared memory (their batches in flight,
    prefetch_factor 2 each, plus one, pass through ``path``), or None (enough, or unknown)."""
    if not workers:
        return None
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free, need = st.f_bavail * st.f_frsize, (2 * workers + 1) * batch_bytes
    if free >= need:
        return None
    return (f"{path} has {free / 2**20:.0f} MiB free but {workers} workers keep about {need / 2**20:.0f} MiB of "
            "batches in shared memory (a container needs a larger --shm-size)")


def _loader_case(data_src: LoaderData, workers: int, device: str, rates: List[StepRate]) -> Case:
    cuda = str(device).startswith("cuda")
    spec = data_src.spec
    clip = f"{spec['frames']}x{spec['size']}x{spec['size']}"
    batches = BATCHES_PER_WORKER * max(1, workers)
    clips = batches * LOADER_BATCH
    state = _LoaderState(data_src)
    kw = dict(prefetch_factor=2) if workers else {}
    loader = torch.utils.data.DataLoader(
        data_src.dataset, batch_size=LOADER_BATCH, sampler=_Endless(len(data_src.dataset)), drop_last=True,
        num_workers=workers, collate_fn=_collate(), pin_memory=cuda, persistent_workers=False, **kw)
    match = next((r for r in rates if r.clip == clip), None)
    data: Dict[str, object] = {
        "workers": workers, "batch": LOADER_BATCH, "batches_per_call": batches, "clips_per_call": clips,
        "clip": clip, "images": IMAGES, "codec": data_src.codec, "dataset_clips": len(data_src.dataset),
        "pin_memory": cuda, "clips_per_s": None, "step": match.name if match else None, "step_clips_per_s": None,
        "ratio_to_step": None,
    }
    timed = _Timed(lambda: [next(state.it) for _ in range(batches)], "cpu")

    def run():
        if state.it is None:
            for other in list(_LIVE_LOADERS):  # stop the workers of the loader timed before this one
                other.it = None
            _LIVE_LOADERS.clear()
            _LIVE_LOADERS.add(state)
            state.it = iter(loader)
        timed()
        data["clips_per_s"] = rate = timed.rate(clips)
        if match is not None:
            step_rate = match.clips_per_s()
            data["step_clips_per_s"] = step_rate
            data["ratio_to_step"] = rate / step_rate if rate and step_rate else None

    target = "; target >= 10x the GPU step's clip rate from 4 workers" if cuda else ""
    note = (f"{batches} batches of {LOADER_BATCH} per call: clips/s = {clips}000 / ms; "
            f"ratio to the {clip} step's clip rate in data{target}")
    return Case(op=LOADER_OP, shape=f"{clip} mp4 +{IMAGES} img b{LOADER_BATCH}", dtype="fp32", layout="bcthw",
                backend=f"{workers} workers", mode="load", run=run, baseline=None,
                baseline_name="", bytes=clips * _item_bytes(spec), note=note, data=data)


def _loader_shape(spec: Dict) -> str:
    return f"{spec['frames']}x{spec['size']}x{spec['size']} mp4 +{IMAGES} img b{LOADER_BATCH}"


# --- the suite ------------------------------------------------------------------------------------------------


def _skip(op: str, shape: str, dtype: str, layout: str, backend: str, mode: str, baseline: str, reason: str) -> Case:
    return Case(op=op, shape=shape, dtype=dtype, layout=layout, backend=backend, mode=mode, run=lambda: None,
                baseline=None, baseline_name=baseline, bytes=0, skip=reason)


def cases(device: str, quick: bool) -> List[Case]:
    """The step rows (quick: the first configuration), then the loader rows (quick: the most workers)."""
    cuda = str(device).startswith("cuda")
    specs = (GPU_STEPS if cuda else CPU_STEPS)[: 1 if quick else None]
    rates: List[StepRate] = []
    out: List[Case] = []
    reason = _missing_diffusers()
    for spec in specs:
        if reason:
            out.append(_skip(STEP_OP, _step_shape(spec), "bf16 amp" if cuda else "fp32", "bcfhw", "auto", STEP_MODE,
                             STEP_BASELINE, reason))
            continue
        out.append(_step_case(spec, device, rates))
        _sync(device)

    loader_spec = GPU_LOADER if cuda else CPU_LOADER
    counts = worker_counts()
    counts = counts[-1:] if quick else counts
    reason = _missing_loader()
    data_src = None
    if not reason:
        try:
            data_src = make_loader_data(loader_spec)
        except Exception as exc:  # the generator or the dataset failed: rows that say so
            reason = f"synthetic mp4 dataset failed ({type(exc).__name__}: {_first_line(exc)})"
    for workers in counts:
        if reason:
            out.append(_skip(LOADER_OP, _loader_shape(loader_spec), "fp32", "bcthw", f"{workers} workers", "load", "",
                             reason))
        elif shm_shortfall(workers, LOADER_BATCH * _item_bytes(loader_spec)):
            out.append(_skip(LOADER_OP, _loader_shape(loader_spec), "fp32", "bcthw", f"{workers} workers", "load", "",
                             shm_shortfall(workers, LOADER_BATCH * _item_bytes(loader_spec))))
        else:
            out.append(_loader_case(data_src, workers, device, rates))
    return out
