"""osp._utils, the torch-only layer below ops and kernels, and the import rules around it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osp import _utils
from osp._utils import ACTIVATIONS, autocast_dtype, memory_format_of, optional_module

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_nothing_of_osp_but_utils():
    """kernels/ sits below osp.ops: importing ops, nn or models from it would be a cycle."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("osp") or name == "osp._utils", f"{path.name} imports {name}"


def test_importing_ops_needs_no_triton():
    code = "import sys, osp.ops; assert 'triton' not in sys.modules, 'osp.ops imported triton'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_kernel_activation_codes_come_from_the_one_tuple():
    from osp.kernels import group_norm as kernel

    assert kernel._ACT_CODE == {None: 0, "silu": 1} and tuple(kernel._ACT_CODE) == ACTIVATIONS


def test_autocast_dtype(monkeypatch):
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("meta") is None  # a device type autocast does not know
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None

    # torch < 2.4: is_autocast_enabled takes no device, each device type has its own functions.
    def no_device_argument(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes no arguments (1 given)")
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", no_device_argument)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: True, raising=False)
    monkeypatch.setattr(torch, "get_autocast_cpu_dtype", lambda: torch.float16, raising=False)
    assert autocast_dtype("cpu") == torch.float16
    assert autocast_dtype("cuda") is None
    assert autocast_dtype("xpu") is None


def test_optional_module(tmp_path, monkeypatch):
    module, why = optional_module("json", "json", "json")
    assert module is not None and why is None
    assert optional_module("osp_no_such_module", "no-such", "extra") == (
        None, "no-such is not installed (pip install no-such, or the osp[extra] extra)")
    (tmp_path / "osp_broken_module").mkdir()
    (tmp_path / "osp_broken_module" / "__init__.py").write_text("raise OSError('undefined symbol: at::foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, why = optional_module("osp_broken_module", "broken", "extra")
    assert module is None and why == "broken failed to import: OSError: undefined symbol: at::foo"
    assert _utils.triton_missing() is None  # the test environment has triton


@pytest.mark.parametrize("layout,expected", [
    ("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d),
    ("size-1-channels", torch.contiguous_format),  # both layouts at once: plain contiguous wins
])
def test_memory_format_of(layout, expected):
    x = torch.randn(2, 3 if layout != "size-1-channels" else 1, 4, 5, 6)
    if layout != "contiguous":
        x = x.to(memory_format=torch.channels_last_3d)
    assert memory_format_of(x) == expected
