"""The osp.ops seam: automatic choice, the three ways to force a backend, errors, logging, info."""
import logging
import subprocess
import sys

import pytest
import torch

import osp
from osp.ops import BackendUnavailable, use_backend
from osp.ops._dispatch import _LOGGED
from parity import DEVICE

GN = osp.ops.registered_ops()["group_norm"]


def gn_args(dtype=torch.float32):
    return (torch.randn(2, 8, 3, 4, 4, device=DEVICE, dtype=dtype), 4, None, None, 1e-6, "silu")


def chosen(args=None, backend=None):
    return GN.select(args or gn_args(), {}, backend).name


def test_automatic_choice_follows_the_reasons():
    expected = "triton" if DEVICE == "cuda" else "torch"  # on CPU the interpreter is never picked unasked
    assert chosen() == expected
    assert chosen(gn_args(torch.float64)) == "torch"  # float64 stays exact on the torch backend
    reasons = GN.explain(*gn_args(torch.float64))
    assert reasons["torch"] is None and "float64" in reasons["triton"]


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


@pytest.mark.parametrize("bad", ["group_norm=cuda", "group_norm=ext"])
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
    assert "group_norm       triton" in out and "group_norm       torch   usable" in out
