"""The osp.ops seam: automatic choice, the three ways to force a backend, errors, logging, info."""
import logging
import re
import subprocess
import sys

import pytest
import torch

import osp
from osp.ops import BackendUnavailable, use_backend
from osp.ops import _ext
from osp.ops._dispatch import _LOGGED
from parity import DEVICE

GN = osp.ops.registered_ops()["group_norm"]


def gn_args(dtype=torch.float32):
    return (torch.randn(2, 8, 3, 4, 4, device=DEVICE, dtype=dtype), 4, None, None, 1e-6, "silu")


def chosen(args=None, backend=None):
    return GN.select(args or gn_args(), {}, backend).name


def test_automatic_choice_follows_the_reasons():
    # On CPU the interpreter is never picked unasked; the compiled extension is, when built.
    expected = "triton" if DEVICE == "cuda" else ("ext" if _ext.AVAILABLE else "torch")
    assert chosen() == expected
    assert chosen(gn_args(torch.float64)) == "torch"  # float64 stays exact on the torch backend
    reasons = GN.explain(*gn_args(torch.float64))
    assert reasons["torch"] is None and "float64" in reasons["triton"]
    assert "float64" in reasons["ext"] if _ext.AVAILABLE else reasons["ext"] == _ext.REASON


def test_argument_context_and_environment_force_a_backend(monkeypatch):
    monkeypatch.setenv("OSP_BACKEND", "torch")
    assert chosen() == "torch"
    monkeypatch.setenv("OSP_BACKEND", "group_norm=triton,attention=torch")
    assert chosen() == "triton"
    with use_backend("torch"):  # the context manager beats the environment
        assert chosen() == "torch"
        with use_backend(group_norm="triton"):  # nested, per op
            assert chosen() == "triton"
        assert chosen(backend="triton") == "triton"  # the argument beats everything
    monkeypatch.setenv("OSP_BACKEND", "ext")  # a global name an op lacks leaves that op free
    assert chosen() in GN.backends


def test_forcing_an_unusable_backend_lists_every_reason():
    with pytest.raises(BackendUnavailable) as info:
        osp.ops.group_norm(*gn_args(torch.float64)[:5], act="silu", backend="triton")
    msg = str(info.value)
    assert "backend 'triton' was forced but cannot run" in msg
    assert "triton: float64" in msg and "torch: usable" in msg


@pytest.mark.parametrize("bad", ["group_norm=cuda", "group_norm=flash_attn"])
def test_unknown_backend_names_are_value_errors(monkeypatch, bad):
    monkeypatch.setenv("OSP_BACKEND", bad)
    with pytest.raises(ValueError, match="unknown backend"):
        chosen()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with use_backend("nope"):
            pass


def test_choice_is_logged_once_per_op_and_backend(caplog):
    _LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="osp.ops"):
        for _ in range(3):
            osp.ops.group_norm(*gn_args()[:5], act="silu", backend="torch")
    lines = [r.getMessage() for r in caplog.records if r.name == "osp.ops"]
    assert lines == ["osp.ops.group_norm -> torch (forced)"]


def test_info_reports_each_backend():
    out = subprocess.run([sys.executable, "-m", "osp", "info"], capture_output=True, text=True, check=True).stdout
    assert f"osp {osp.__version__}" in out and f"torch {torch.__version__}" in out
    assert re.search(r"^  group_norm +triton ", out, re.M) and re.search(r"^  group_norm +torch +usable", out, re.M)


def select(op_name, backend=None):
    """The backend an op would run for its probe call on this device."""
    op = osp.ops.registered_ops()[op_name]
    args, kwargs = op.probe(DEVICE, torch.float32)
    return op.select(args, kwargs, backend).name


def test_every_op_is_registered_with_its_file_as_group():
    groups = {name: op.group for name, op in osp.ops.registered_ops().items()}
    assert groups == {
        "attention": "attention", "causal_conv3d": "causal_conv3d",
        "group_norm": "group_norm", "group_norm_fixed_stats": "group_norm",
        "layer_norm_modulate": "modulation", "gated_residual": "modulation",
        "blend_tile_": "tile_blend", "blend_normalize_": "tile_blend",
    }
    for name in groups:  # every public op has a probe whose call each backend can explain
        op = osp.ops.registered_ops()[name]
        args, kwargs = op.probe(DEVICE, torch.float32)
        assert set(op.explain(*args, **kwargs)) == set(op.backends)


@pytest.mark.parametrize("how", ["environment", "context"])
def test_a_file_name_forces_every_op_of_the_file(monkeypatch, how):
    """modulation=triton forces both ops of modulation.py; an op's own name takes precedence; a
    group's choice skips the ops that lack that backend (blend_normalize_ has no triton)."""
    free = "triton" if DEVICE == "cuda" else "torch"  # what automatic choice gives here
    free_normalize = "ext" if _ext.why_not("blend_normalize_", DEVICE) is None else "torch"
    choices = {"modulation": "triton", "gated_residual": "torch", "tile_blend": "triton", "group_norm": "torch"}

    def forced():
        return {name: select(name) for name in ("layer_norm_modulate", "gated_residual", "blend_tile_",
                                                 "blend_normalize_", "group_norm", "group_norm_fixed_stats",
                                                 "causal_conv3d")}

    expected = {"layer_norm_modulate": "triton", "gated_residual": "torch", "blend_tile_": "triton",
                "blend_normalize_": free_normalize, "group_norm": "torch", "group_norm_fixed_stats": "torch",
                "causal_conv3d": free}
    if how == "environment":
        monkeypatch.setenv("OSP_BACKEND", ",".join(f"{k}={v}" for k, v in choices.items()))
        assert forced() == expected
    else:
        with use_backend(**choices):
            assert forced() == expected
        with use_backend("triton", modulation="torch"):  # the group beats the global choice
            assert select("layer_norm_modulate") == "torch" and select("causal_conv3d") == "triton"
            assert select("blend_normalize_") == free_normalize  # no triton backend: chooses freely
    with use_backend(modulation="torch"):  # the context beats the environment for the group too
        assert select("layer_norm_modulate") == "torch"


def test_unknown_op_or_group_names_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown op 'modulatoin' in use_backend; expected an op or file name: .*modulation"):
        with use_backend(modulatoin="torch"):
            pass
    with pytest.raises(ValueError, match=r"unknown backend 'flash_attn' for the ops of modulation"):
        with use_backend(modulation="flash_attn"):
            pass
    with pytest.raises(ValueError, match=r"unknown backend 'triton' for op blend_normalize_"):
        with use_backend(blend_normalize_="triton"):
            pass
    monkeypatch.setenv("OSP_BACKEND", "tile_blnd=torch")
    with pytest.raises(ValueError, match=r"unknown op 'tile_blnd' in OSP_BACKEND='tile_blnd=torch'"):
        select("blend_tile_")


def test_blend_normalize_goes_through_dispatch(caplog):
    _LOGGED.clear()
    out, wsum = torch.ones(1, 2, 3, 4, 5, device=DEVICE), torch.full((3, 4, 5), 2.0, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="osp.ops"), use_backend(tile_blend="torch"):
        osp.ops.blend_normalize_(out, wsum)
    assert "osp.ops.blend_normalize_ -> torch (forced)" in [r.getMessage() for r in caplog.records]
    assert torch.equal(out, torch.full_like(out, 0.5))


@pytest.mark.parametrize("how", ["argument", "automatic", "context", "environment"])
def test_dispatch_traces_under_torch_compile_without_graph_breaks(monkeypatch, how):
    """fullgraph=True: no graph break from the forced-choice lookup (context variable, environment),
    the reasons or the logging; the context/environment choice in force at compile time is kept."""
    x = torch.randn(2, 8, 3, 4, 5, device=DEVICE)
    kwargs = {"backend": "torch"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("OSP_BACKEND", "group_norm=torch")
    graphs = []

    def capture(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    fn = torch.compile(lambda x: osp.ops.group_norm(x, 4, act="silu", **kwargs) * 2, fullgraph=True, backend=capture)
    if how == "context":
        with use_backend(group_norm="torch"):
            out = fn(x)
    else:
        out = fn(x)
    torch.testing.assert_close(out, osp.ops.group_norm(x, 4, act="silu", backend="torch") * 2, rtol=1e-5, atol=1e-5)
    if how != "automatic":
        assert "group_norm" in graphs[-1] and "osp_C" not in graphs[-1]
