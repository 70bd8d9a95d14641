"""One small parity case per public op, forward and every input gradient (``osp demo``'s table).

A case is the op's call, the plain PyTorch formula it must equal, and fresh seeded inputs. The
formula evaluated in the tested dtype sets the tolerance; evaluated on float64 copies of the same
inputs it is the reference (the rule in ``osp.testing.parity``). The cases use awkward shapes on
purpose (odd sizes, channels_last_3d, masks); the exhaustive sweeps are the test suite's.

    for case in CASES["group_norm"]:
        for output, p in case.check("triton", torch.float32, "cpu"):
            assert p.ok, (case.name, output, p)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from .parity import Parity, parity

Inputs = Tuple[Dict[str, torch.Tensor], Dict[str, object]]


@dataclass(frozen=True)
class OpCase:
    """``call(*tensors, backend=..., **kwargs)`` runs the op; ``formula(*tensors, **kwargs)`` is plain
    PyTorch; ``inputs(device, dtype, generator)`` gives the differentiable tensors by name (their
    gradients are checked) and the other keyword arguments (masks) shared by call and formula."""

    op: str
    name: str
    call: Callable[..., torch.Tensor]
    formula: Callable[..., torch.Tensor]
    inputs: Callable[[str, torch.dtype, torch.Generator], Inputs]

    def seed(self, dtype: torch.dtype) -> int:
        """Stable across processes (not ``hash()``), different per case and dtype."""
        return zlib.crc32(f"{self.op}/{self.name}/{dtype}".encode())

    def check(self, backend: str, dtype: torch.dtype, device: str) -> List[Tuple[str, Parity]]:
        """[("out", Parity), ("d<input>", Parity), ...] for ``backend`` in ``dtype`` on ``device``,
        under a random upstream gradient."""
        g = torch.Generator().manual_seed(self.seed(dtype))
        tensors, kwargs = self.inputs(device, dtype, g)
        names = list(tensors)
        leaves = [t.detach().requires_grad_(True) for t in tensors.values()]
        out = self.call(*leaves, backend=backend, **kwargs)
        dy = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
        torch_out = self.formula(*leaves, **kwargs)
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = self.formula(*leaves64, **kwargs)
        rows = [("out", parity(out, ref.detach(), torch_out))]
        grads = torch.autograd.grad(out, leaves, dy)
        torch_grads = torch.autograd.grad(torch_out, leaves, dy)
        ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
        for name, gr, tg, rg in zip(names, grads, torch_grads, ref_grads):
            rows.append((f"d{name}", parity(gr, rg, tg)))
        return rows


def randn(g: torch.Generator, *shape: int, device: str, dtype: torch.dtype, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    """Seeded normal data drawn on the CPU (the same values on every device), then moved."""
    return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dtype)


def _group_norm_inputs(device, dtype, g) -> Inputs:
    x = randn(g, 2, 64, 5, 12, 10, device=device, dtype=dtype, scale=2, shift=1)
    return dict(x=x.to(memory_format=torch.channels_last_3d), weight=randn(g, 64, device=device, dtype=dtype),
                bias=randn(g, 64, device=device, dtype=dtype)), {}


def _causal_conv3d_formula(x, w, b, r):
    """Upstream's causal conv: replicate the first frame kt-1 times, then conv3d."""
    x = torch.cat([x[:, :, :1]] * (w.shape[2] - 1) + [x], dim=2)
    return F.conv3d(x, w, b, padding=(0, 1, 1)) + r


def _causal_conv3d_inputs(device, dtype, g) -> Inputs:
    x = randn(g, 1, 8, 5, 9, 7, device=device, dtype=dtype).to(memory_format=torch.channels_last_3d)
    return dict(x=x, weight=randn(g, 12, 8, 3, 3, 3, device=device, dtype=dtype, scale=0.2),
                bias=randn(g, 12, device=device, dtype=dtype),
                residual=randn(g, 1, 12, 5, 9, 7, device=device, dtype=dtype)), {}


def _attention_formula(q, k, v, key_padding_mask):
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf")).softmax(-1) @ v


def _attention_inputs(device, dtype, g) -> Inputs:
    mask = torch.ones(2, 19, dtype=torch.bool, device=device)
    mask[0, 11:] = False
    return dict(q=randn(g, 2, 2, 24, 72, device=device, dtype=dtype),
                k=randn(g, 2, 2, 19, 72, device=device, dtype=dtype),
                v=randn(g, 2, 2, 19, 72, device=device, dtype=dtype)), dict(key_padding_mask=mask)


def _layer_norm_modulate_inputs(device, dtype, g) -> Inputs:
    return dict(x=randn(g, 4, 17, 72, device=device, dtype=dtype, scale=2),
                shift=randn(g, 4, 1, 72, device=device, dtype=dtype, scale=0.5),
                scale=randn(g, 4, 1, 72, device=device, dtype=dtype, scale=0.5)), {}


def _gated_residual_inputs(device, dtype, g) -> Inputs:
    return dict(x=randn(g, 4, 17, 72, device=device, dtype=dtype), gate=randn(g, 4, 1, 72, device=device, dtype=dtype),
                y=randn(g, 4, 17, 72, device=device, dtype=dtype)), {}


# Per registered op name: its cases.
CASES: Dict[str, List[OpCase]] = {
    "group_norm": [OpCase(
        "group_norm", "2x64x5x12x10 G=32 silu ndhwc",
        lambda x, w, b, backend: ops.group_norm(x, 32, w, b, 1e-6, act="silu", backend=backend),
        lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-6)),
        _group_norm_inputs)],
    "causal_conv3d": [OpCase(
        "causal_conv3d", "1x8->12x5x9x7 k3 p1 +residual ndhwc",
        lambda x, w, b, r, backend: ops.causal_conv3d(x, w, b, padding=1, residual=r, backend=backend),
        _causal_conv3d_formula,
        _causal_conv3d_inputs)],
    "attention": [OpCase(
        "attention", "q 2x2x24x72, kv 19 masked",
        lambda q, k, v, backend, key_padding_mask: ops.attention(q, k, v, key_padding_mask=key_padding_mask,
                                                                     backend=backend),
        _attention_formula,
        _attention_inputs)],
    "layer_norm_modulate": [OpCase(
        "layer_norm_modulate", "x 4x17x72, mods 4x1x72",
        lambda x, sh, sc, backend: ops.layer_norm_modulate(x, sh, sc, backend=backend),
        lambda x, sh, sc: F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + sc) + sh,
        _layer_norm_modulate_inputs)],
    "gated_residual": [OpCase(
        "gated_residual", "x 4x17x72, gate 4x1x72",
        lambda x, gate, y, backend: ops.gated_residual(x, gate, y, backend=backend),
        lambda x, gate, y: x + gate * y,
        _gated_residual_inputs)],
}
