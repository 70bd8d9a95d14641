"""LatteT2V training step (forward + backward) and denoising forward, osp vs the upstream form.

GPU: LatteT2V-XL/122 (28 layers, 16 x 72) in bf16 weights, batch 2 of 17x256x256 clips (latents
5 x 32 x 32, 256 tokens per frame), T5-length captions (300 tokens, a mask with 120 and 77 valid
tokens). Rows:

- backend "auto": osp.models.LatteT2V with osp's dispatch (flash-attn / Triton attention, fused
  adaLN kernels);
- backend "torch": the same model with every osp op forced to its torch backend (eager layer norm
  and modulation, torch SDPA): osp's model structure alone, no osp kernel;

each timed against the upstream form in the same run: diffusers' LatteTransformer3DModel, the
module-for-module twin of upstream's LatteT2V (spec A.0; its attention is torch SDPA with the
additive -10000 caption bias, its caption keys and values are projected once per frame). Modes:
"fwd+bwd" (one training step without the optimizer), "fwd+bwd ckpt" (gradient checkpointing on
both sides, as upstream trains) and "fwd" (no grad, one denoising step). Peak memory of one call of
each side goes into the note (the harness has no field for it).

FLOPs count the useful matmul and attention work once (caption keys/values per caption, not per
frame); a training step counts 3x the forward. Bytes count the weights read by the forward (and
again by the backward, plus the weight gradients written).

CPU: a tiny configuration in fp32 (the Triton rows only with TRITON_INTERPRET=1; they check that
the kernels run, not speed).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional

import torch

import osp
from osp.models import LatteT2V

from .harness import INTERPRETER_NOTE, Case

BATCH = 2
GPU_CONFIG = dict(preset="LatteT2V-XL/122", frames=5, size=32, caption_len=300, valid=(120, 77))
CPU_CONFIG = dict(overrides=dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, sample_size=8,
                                 caption_channels=32), frames=5, size=8, caption_len=16, valid=(11, 4))
BASELINE_NAME = "diffusers LatteTransformer3DModel (upstream twin, SDPA, -10000 bias)"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def forward_flops(cfg: Dict, b: int, frames: int, H: int, W: int, L: int) -> int:
    """Useful FLOPs of one LatteT2V forward (2 x multiply-adds of every matmul and attention)."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, layers = cfg["patch_size"], cfg["num_layers"]
    T = (H // p) * (W // p)
    N = b * frames * T
    spatial = N * (4 + 2 + 8) * D * D + b * L * 2 * D * D + b * frames * 2 * D * (T * T + T * L)
    temporal = N * (4 + 8) * D * D + b * T * 2 * D * frames * frames
    ends = N * p * p * D * (cfg["in_channels"] + cfg["out_channels"]) + b * L * (cfg["caption_channels"] + D) * D \
        + b * (256 * D + 7 * D * D)
    return 2 * (layers * (spatial + temporal) + ends)


def _twin(model: LatteT2V):
    """diffusers' LatteTransformer3DModel with model's weights and upstream's temp_pos_embed."""
    from diffusers import LatteTransformer3DModel

    c = model.config
    sample = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    p = next(model.parameters())
    with torch.device(p.device):
        twin = LatteTransformer3DModel(
            num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
            in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers, dropout=0.0,
            cross_attention_dim=model.inner_dim, attention_bias=True, sample_size=sample, patch_size=c.patch_size,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=c.norm_eps, caption_channels=c.caption_channels,
            video_length=c.video_length)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "caption_projection.y_embedding"})
    twin.temp_pos_embed = model.temp_pos_embed.clone()
    return torch.nn.Module.to(twin, p.dtype)  # ModelMixin.to warns on every dtype cast


def _peak_mib(fn: Callable, device: str) -> Optional[float]:
    """Peak memory above what was allocated before one call of fn, in MiB (CUDA only)."""
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _callable(forward: Callable[[], torch.Tensor], mode: str, dy: torch.Tensor,
              backend: Optional[str]) -> Callable[[], object]:
    def ctx():
        return osp.ops.use_backend(backend) if backend else contextlib.nullcontext()

    if mode == "fwd":
        def run():
            with ctx(), torch.no_grad():
                return forward()
    else:
        def run():
            with ctx():
                out = forward()
            out.backward(dy)
    return run


def cases(device: str, quick: bool) -> List[Case]:
    cuda = device.startswith("cuda")
    spec = GPU_CONFIG if cuda else CPU_CONFIG
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LatteT2V.from_preset(spec.get("preset", "LatteT2V-XL/122"), **spec.get("overrides", {}))
    model = model.to(dtype).train()
    cfg = dict(model.config)
    twin = _twin(model).train()

    F_, S, L = spec["frames"], spec["size"], spec["caption_len"]
    x = torch.randn(BATCH, cfg["in_channels"], F_, S, S, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (BATCH,), device=device)
    ehs = torch.randn(BATCH, L, cfg["caption_channels"], device=device, dtype=dtype)
    mask = (torch.arange(L, device=device)[None] < torch.tensor(spec["valid"], device=device)[:, None]).long()
    bias = ((1 - mask.to(dtype)) * -10000.0)[:, None].repeat_interleave(F_, 0)
    dy = torch.randn(BATCH, cfg["out_channels"], F_, S, S, device=device, dtype=dtype)

    def ours():
        return model(x, t, ehs, encoder_attention_mask=mask).sample

    def upstream():
        return twin(x, t, ehs, bias).sample

    fwd_flops = forward_flops(cfg, BATCH, F_, S, S, L)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shape = f"{spec.get('preset', 'tiny')} b{BATCH} {F_}x{S}x{S} L{L}"
    backends = ["auto", "torch"] if cuda else ["auto"] + (
        ["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    modes = ["fwd+bwd"] if quick else ["fwd+bwd", "fwd+bwd ckpt", "fwd"]
    out: List[Case] = []
    for mode in modes:
        baseline = _with_checkpointing(_callable(upstream, mode, dy, None), (twin,), mode == "fwd+bwd ckpt")
        params = list(model.parameters()) + list(twin.parameters())
        peak_base = _peak_mib(baseline, device)
        flops = fwd_flops * (1 if mode == "fwd" else 3)
        nbytes = weight_bytes * (1 if mode == "fwd" else 3)
        for be in backends:
            run = _with_checkpointing(_callable(ours, mode, dy, None if be == "auto" else be), (model,),
                                      mode == "fwd+bwd ckpt")
            peak = _peak_mib(run, device)
            for prm in params:
                prm.grad = None
            note = f"peak MiB: osp {peak:.0f}, upstream twin {peak_base:.0f}" if peak is not None else ""
            if be == "triton" and not cuda:
                note = INTERPRETER_NOTE
            out.append(Case(
                op="latte_t2v_step" if mode != "fwd" else "latte_t2v_forward", shape=shape,
                dtype=DTYPE_NAMES[dtype], layout="bcfhw", backend=be, mode=mode, run=run, baseline=baseline,
                baseline_name=BASELINE_NAME, bytes=nbytes, flops=flops, grad_to_none=params, note=note,
            ))
    return out


_CHECKPOINTING: Dict[int, bool] = {}


def _with_checkpointing(fn: Callable, models, on: bool) -> Callable[[], object]:
    """fn with gradient checkpointing switched on or off for ``models`` before the call, when it is
    not already so (cases of different modes share the models; the switch stays out of timings)."""
    def run():
        for m in models:
            if _CHECKPOINTING.get(id(m)) != on:
                (m.enable_gradient_checkpointing if on else m.disable_gradient_checkpointing)()
                _CHECKPOINTING[id(m)] = on
        return fn()
    return run
