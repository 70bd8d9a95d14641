"""The command line (osp.cli): its commands run, a user mistake is one line and exit code 2, the
benchmark suites run only from a source checkout, and the library never imports bench/."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osp import ops
from osp.cli import bench as bench_cmd
from osp.cli import demo as demo_cmd
from osp.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("osp ")
    for name in ops.registered_ops():
        assert f"  {name} " in out, name


def test_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'frobnicate'" in err[0] and "info" in err[0]


def test_unknown_argument_of_a_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--frobnicate"])
    assert exc.value.code == 2
    assert "--frobnicate" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    """An installed osp (no bench/ beside the package) run from a folder that is no checkout."""
    monkeypatch.setattr(bench_cmd, "PACKAGE_PARENT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no suite may run outside a checkout"))
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkout" in err[0] and str(tmp_path) in err[0]


def test_bench_runs_the_checkout_suites_in_a_subprocess(tmp_path, monkeypatch, capfd):
    """From a checkout the arguments reach ``python -m bench`` (here: its own refusal of an unknown op)."""
    monkeypatch.chdir(tmp_path)  # the checkout is found through the package's location
    assert bench_cmd.checkout() == ROOT
    assert main(["bench", "--ops", "no_such_op"]) == 2
    assert "no_such_op" in capfd.readouterr().err


def test_python_dash_m_osp_exits_2_on_an_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "osp", "frobnicate"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "frobnicate" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is chosen on CPU only")
def test_demo_sets_the_interpreter_before_triton_is_imported(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    demo_cmd.use_interpreter_on_cpu()
    assert os.environ["TRITON_INTERPRET"] == "1"

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setitem(sys.modules, "triton", object())
    demo_cmd.use_interpreter_on_cpu()
    assert "TRITON_INTERPRET" not in os.environ
    assert "triton was imported" in capsys.readouterr().err


def test_demo_parity_cases_run_on_the_torch_backend():
    """The shared op cases the demo's table runs: every output and gradient is compared."""
    from osp.testing.op_cases import CASES

    for op_name, cases in CASES.items():
        assert op_name in ops.registered_ops()
        for case in cases:
            rows = case.check("torch", torch.float32, "cpu")
            assert rows[0][0] == "out" and len(rows) > 1
            assert all(p.ok for _, p in rows), (case.name, rows)


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_the_library_never_imports_bench():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "osp").rglob("*.py"))
                 for m in _imported_modules(p) if m == "bench" or m.startswith("bench.")]
    assert not offenders, offenders
    for p in (ROOT / "osp").rglob("*.py"):
        assert "import_module(\"bench" not in p.read_text() and "import_module('bench" not in p.read_text(), p
