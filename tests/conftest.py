"""Test harness: device choice, the Triton interpreter on CPU, NaN-poisoned allocations.

Without a GPU, TRITON_INTERPRET=1 is set here, before anything imports triton, so the same tests
run every Triton kernel through the interpreter on CPU; with a GPU they run compiled.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Interpreter programs are numpy-bound; more torch threads than cores only adds contention.
torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

import pytest  # noqa: E402


def pytest_report_header(config):
    return f"osp tests on {DEVICE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


# torch.device(...) as a context manager caches its set of factory functions on first use; computing
# it now, before any patching below, keeps the real torch.empty in it (else meta-device builds would
# silently allocate on the CPU).
try:
    from torch.utils._device import _device_constructors

    _device_constructors()
except ImportError:  # a torch without device contexts has nothing to keep consistent
    pass


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    """Every floating torch.empty / torch.empty_like is filled with NaN, so an output element a
    kernel forgot to write fails the comparison instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture
def device():
    return DEVICE

