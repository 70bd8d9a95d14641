"""The compiled extension osp._C: group_norm's ``ext`` backend against the float64 reference at every
CPU ISA level built, determinism, the in-place form, torch.library registrations (opcheck,
torch.compile), input checks in C++, and the loader's and setup.py's switches (which run without a
built extension too)."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import osp
import osp.cli.info
from osp.ops import _ext, group_norm, group_norm_, group_norm_reference
from parity import DEVICE
from test_group_norm import LAYOUTS, SHAPES, check_against_reference, make_input

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _ext.AVAILABLE, reason=f"osp._C not usable: {_ext.REASON}")
on_cpu = pytest.mark.skipif(DEVICE != "cpu", reason="the extension's kernels are CPU kernels")
ISAS = _ext.cpu_isas() or ["default"]
EXT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.fixture(autouse=True)
def poisoned_cpp_outputs():
    """As the conftest's NaN-filled torch.empty, for the tensors C++ allocates."""
    if not _ext.AVAILABLE:
        yield
        return
    before = torch.ops.osp_C.set_poison_outputs(True)
    yield
    torch.ops.osp_C.set_poison_outputs(before)


@pytest.fixture
def isa(request):
    """Force one ISA level for the test, then go back to the automatic choice."""
    active = _ext.set_cpu_isa(request.param)
    assert active == request.param
    yield active
    _ext.set_cpu_isa("")


def cases():
    return [(shape, g, lay) for _, shape, g in SHAPES for lay in LAYOUTS if not (lay == "channels_last" and len(shape) == 3)]


def case_ids():
    return [f"{name}-{lay}" for name, shape, _ in SHAPES for lay in LAYOUTS if not (lay == "channels_last" and len(shape) == 3)]


# ----------------------------------------------------------------------------- parity

@needs_ext
@on_cpu
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", EXT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,groups,layout", cases(), ids=case_ids())
def test_ext_matches_reference(shape, groups, layout, dtype, isa):
    """Forward and the gradients of x, weight and bias, within DESIGN.md's parity rule."""
    check_against_reference(shape, groups, layout, dtype, backend="ext")


@needs_ext
@on_cpu
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("act", [None, "silu"], ids=["no-act", "silu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_ext_variants(act, affine, isa):
    # 37 channels: not a multiple of any vector width, so every loop has a tail.
    check_against_reference((2, 37, 3, 5, 7), 37, "channels_last", torch.float32, act=act, affine=affine, backend="ext")
    check_against_reference((2, 8, 5, 9, 11), 4, "contiguous", torch.bfloat16, act=act, affine=affine, backend="ext")


@needs_ext
@on_cpu
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ext_large_groups_split_across_blocks(layout, isa):
    """Groups of many blocks (the VAE's case): the block moments must merge exactly."""
    x = make_input((2, 64, 9, 24, 24), layout, torch.float32) * 2 + 5
    w, b = torch.randn(64), torch.randn(64)
    out = group_norm(x, 32, w, b, act="silu", backend="ext")
    assert out.stride() == x.stride()
    torch.testing.assert_close(out.double(), group_norm_reference(x, 32, w, b, 1e-6, "silu"), rtol=1e-5, atol=2e-5)


@needs_ext
@on_cpu
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_fp32_parameters_next_to_a_bf16_input(backend):
    x = make_input((2, 8, 5, 6, 7), "channels_last", torch.bfloat16).requires_grad_(True)
    w = (torch.randn(8) * 0.5 + 1).requires_grad_(True)
    b = torch.randn(8).requires_grad_(True)
    out = group_norm(x, 4, w, b, act="silu", backend=backend)
    assert out.dtype == torch.bfloat16 and out.stride() == x.stride()
    grads = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


@needs_ext
@on_cpu
def test_ext_is_the_automatic_choice_on_cpu():
    x = make_input((1, 8, 3, 4, 5), "contiguous", torch.float32)
    op = osp.ops.registered_ops()["group_norm"]
    assert op.select((x, 4, None, None, 1e-6, "silu"), {}).name == "ext"
    assert op.select((x.double(), 4, None, None, 1e-6, "silu"), {}).name == "torch"


# ----------------------------------------------------------------------------- determinism

@needs_ext
@on_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_two_runs_and_thread_counts_are_bit_equal(layout):
    """Fixed blocks merged in a fixed order: the same bits every run and with any thread count."""
    x = make_input((2, 32, 5, 40, 41), layout, torch.float32).requires_grad_(True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    dy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)

    def run():
        y = group_norm(x, 8, w, b, act="silu", backend="ext")
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_, c in zip(first, second, single):
        assert torch.equal(a, b_) and torch.equal(a, c)


# ----------------------------------------------------------------------------- in place

@needs_ext
@on_cpu
@pytest.mark.parametrize("dtype", EXT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_place_form_equals_the_functional_op(layout, dtype):
    x = make_input((2, 12, 5, 7, 9), layout, dtype)
    w, b = torch.randn(12).to(dtype), torch.randn(12).to(dtype)
    expected = group_norm(x, 4, w, b, act="silu", backend="ext")
    ptr = x.data_ptr()
    with torch.no_grad():
        out = group_norm_(x, 4, w, b, act="silu")
    assert out is x and x.data_ptr() == ptr and x.stride() == expected.stride()
    assert torch.equal(x, expected)  # same kernels: the same bits


@needs_ext
@on_cpu
def test_in_place_form_falls_back_and_refuses_gradients():
    base = make_input((2, 8, 5, 6, 14), "contiguous", torch.float32)
    view = base[..., ::2]  # not dense: the kernel cannot write it in place, torch does
    expected = group_norm(view, 4, act="silu", backend="torch")
    with pytest.raises(osp.ops.BackendUnavailable, match="neither contiguous nor dense channels-last"):
        group_norm_(view, 4, act="silu", backend="ext")
    group_norm_(view, 4, act="silu")
    torch.testing.assert_close(view, expected)
    with pytest.raises(ValueError, match="records no gradient"):
        group_norm_(torch.randn(2, 8, 4, requires_grad=True), 4)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        group_norm_(torch.randn(2, 8, 4), 4, backend="triton")


def test_in_place_form_honours_a_forced_backend():
    """use_backend / OSP_BACKEND forcing group_norm applies to group_norm_: a forced torch or triton
    runs out of place and is copied back, and group_norm_in_place_why_not says so."""
    from osp.ops.group_norm import group_norm_in_place_why_not

    x = make_input((2, 8, 3, 4, 6), "contiguous", torch.float32)
    expected = group_norm(x, 4, act="silu", backend="torch")
    with osp.ops.use_backend("torch"):
        assert "group_norm's backend 'torch' is forced" in group_norm_in_place_why_not(x, 4, act="silu")
        with torch.no_grad():
            assert group_norm_(x, 4, act="silu") is x
    torch.testing.assert_close(x, expected)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        group_norm_in_place_why_not(x, 4, backend="triton")
    if _ext.AVAILABLE and DEVICE == "cpu":
        assert group_norm_in_place_why_not(x, 4, act="silu") is None
        assert "neither contiguous nor dense" in group_norm_in_place_why_not(x[..., ::2], 4)


def _spy_in_place(monkeypatch):
    """Record the data pointer of every tensor osp.nn.GroupNorm hands to the in-place op."""
    import osp.nn.group_norm as nn_group_norm

    calls, real = [], nn_group_norm.group_norm_
    monkeypatch.setattr(nn_group_norm, "group_norm_", lambda x, *a, **k: calls.append(x.data_ptr()) or real(x, *a, **k))
    return calls


@needs_ext
@on_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_in_place_only_without_gradients(layout, monkeypatch):
    from osp.nn import GroupNorm

    calls = _spy_in_place(monkeypatch)
    norm = GroupNorm(4, 12, eps=1e-6, act="silu")
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = make_input((2, 12, 5, 7, 9), layout, torch.float32)
    expected = norm(x)
    # Gradients recorded (parameters need them): out of place, x untouched, same values.
    before = x.clone()
    out = norm(x, inplace=True)
    assert out.data_ptr() != x.data_ptr() and torch.equal(x, before) and torch.equal(out, expected)
    assert out.grad_fn is not None and calls == []
    with torch.no_grad():
        out = norm(x, inplace=True)
    assert calls == [x.data_ptr()] and out is x and torch.equal(x, expected)
    with torch.no_grad(), osp.ops.use_backend("torch"):  # forced torch: nothing in place
        y = make_input((2, 12, 5, 7, 9), layout, torch.float32)
        assert norm(y, inplace=True) is not y and len(calls) == 1


def _resnet_block(cin, cout):
    from osp.models.vae.blocks import ResnetBlock3D

    torch.manual_seed(0)
    block = ResnetBlock3D(cin, cout)
    for m in block.modules():
        if isinstance(m, torch.nn.GroupNorm):  # not the identity init: every parameter matters
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return block


@needs_ext
@on_cpu
@pytest.mark.parametrize("cin,cout", [(32, 32), (32, 64)], ids=["same-channels", "nin-shortcut"])
def test_vae_resnet_block_norms_its_own_tensor_in_place_in_inference(cin, cout, monkeypatch):
    """Under no_grad the second norm (over conv1's output, which nothing else reads) runs in place;
    the first, over the block's input x that the shortcut reads, never does. Same result as the
    out-of-place block."""
    block = _resnet_block(cin, cout).eval()
    x = make_input((1, cin, 5, 6, 10), "contiguous", torch.float32)
    with torch.no_grad():
        expected = block(x)
    calls = _spy_in_place(monkeypatch)
    norm2_inputs = []
    block.norm2.register_forward_pre_hook(lambda m, args: norm2_inputs.append(args[0].data_ptr()))
    before = x.clone()
    with torch.no_grad():
        out = block(x)
    assert calls == norm2_inputs and len(calls) == 1  # norm2 alone, on conv1's output
    assert torch.equal(x, before)
    assert torch.equal(out, expected)


@needs_ext
@on_cpu
def test_vae_resnet_block_training_is_unchanged_by_the_in_place_form(monkeypatch):
    """With gradients recorded nothing runs in place: the forward and every gradient are bit-equal
    to the same block whose norms ignore ``inplace``."""
    from osp.nn import GroupNorm

    block = _resnet_block(32, 64).train()
    x = make_input((1, 32, 5, 6, 10), "contiguous", torch.float32).requires_grad_()
    dy = torch.randn(1, 64, 5, 6, 10)

    def run():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.backward(dy)
        return [out.detach()] + [x.grad] + [p.grad for p in block.parameters()]

    calls = _spy_in_place(monkeypatch)
    got = run()
    assert calls == []
    real_forward = GroupNorm.forward
    monkeypatch.setattr(GroupNorm, "forward", lambda self, x, inplace=False: real_forward(self, x))
    want = run()
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------- torch.library

@needs_ext
@on_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 8, 3, 5, 6), layout, torch.float32)
    w, b = torch.randn(8), torch.randn(8)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    torch.library.opcheck(torch.ops.osp_C.group_norm_act, (xg, wg, bg, 4, 1e-6, True))
    torch.library.opcheck(torch.ops.osp_C.group_norm_act, (x.half(), None, None, 2, 1e-5, False))
    _, mean, rstd = torch.ops.osp_C.group_norm_act(x, w, b, 4, 1e-6, True)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.osp_C.group_norm_act_backward, (dy, x, w, b, mean, rstd, 4, True, True))
    torch.library.opcheck(torch.ops.osp_C.group_norm_act_backward, (dy, x, None, None, mean, rstd, 4, False, False))
    torch.library.opcheck(torch.ops.osp_C.group_norm_act_, (x.clone(), w, b, 4, 1e-6, True))


def _compiled(fn, backend):
    graphs = []

    def capture(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=capture if backend == "capture" else backend)
    return compiled, graphs


@needs_ext
@on_cpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_the_dispatcher_without_graph_breaks(backend):
    """fullgraph=True: the dispatch (checks, forced choice, reasons) and the op trace in one graph;
    forward and backward equal eager."""
    def f(x, w, b):
        return group_norm(x, 4, w, b, 1e-6, act="silu", backend="ext") * 2

    x = make_input((2, 8, 3, 4, 5), "channels_last", torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, torch.randn(8), torch.randn(8))]
    compiled, _ = _compiled(f, backend)
    out = compiled(*leaves)
    expected = f(*leaves)
    torch.testing.assert_close(out, expected)
    dy = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        torch.testing.assert_close(g, e)


@needs_ext
@on_cpu
def test_torch_compile_keeps_the_automatic_and_context_choice():
    x = make_input((1, 8, 3, 4, 5), "contiguous", torch.float32)
    auto, graphs = _compiled(lambda x: group_norm(x, 4, act="silu"), "capture")
    torch.testing.assert_close(auto(x), group_norm(x, 4, act="silu", backend="torch"), rtol=1e-5, atol=1e-5)
    assert "osp_C.group_norm_act" in graphs[-1]
    with osp.ops.use_backend(group_norm="torch"):
        forced, graphs = _compiled(lambda x: group_norm(x, 4, act="silu") + 1, "capture")
        forced(x)
    assert "osp_C" not in graphs[-1] and "group_norm" in graphs[-1]


# ----------------------------------------------------------------------------- checks in C++

@needs_ext
@on_cpu
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: op.group_norm_act(torch.randn(2, 8), None, None, 4, 1e-6, True),
         r"group_norm_act: x has shape \[2, 8\] \(rank 2\); expected \(N, C, \*spatial\)"),
        (lambda op: op.group_norm_act(torch.randn(2, 8, 4).double(), None, None, 4, 1e-6, True),
         r"x has dtype Double; expected Float, Half or BFloat16"),
        (lambda op: op.group_norm_act(torch.randn(2, 6, 4), None, None, 4, 1e-6, True),
         r"channels C=6 are not divisible by num_groups=4"),
        (lambda op: op.group_norm_act(torch.randn(2, 8, 4, 6)[..., ::2], None, None, 4, 1e-6, True),
         r"x with shape \[2, 8, 4, 3\] and strides \[192, 24, 6, 2\] is neither contiguous nor dense channels-last"),
        (lambda op: op.group_norm_act(torch.randn(2, 8, 4), torch.randn(5), None, 4, 1e-6, True),
         r"weight has shape \[5\]; expected \[8\] for C=8 channels"),
        (lambda op: op.group_norm_act(torch.randn(2, 8, 4).half(), None, torch.randn(8).bfloat16(), 4, 1e-6, True),
         r"bias has dtype BFloat16 but x has Half; expected Half or Float"),
        (lambda op: op.group_norm_act(torch.randn(2, 8, 4), None, None, 4, 0.0, True), r"eps=0; expected a positive"),
        (lambda op: op.group_norm_act_backward(torch.randn(2, 8, 4), torch.randn(2, 8, 4), None, None,
                                               torch.zeros(2, 3), torch.ones(2, 4), 4, True, True),
         r"group_norm_act_backward: mean has shape \[2, 3\] and dtype Float; expected a contiguous \[2, 4\] Float"),
        (lambda op: op.group_norm_act_backward(torch.randn(2, 8, 5), torch.randn(2, 8, 4), None, None,
                                               torch.zeros(2, 4), torch.ones(2, 4), 4, True, True),
         r"dy has shape \[2, 8, 5\] and dtype Float; expected x's shape \[2, 8, 4\]"),
        (lambda op: op.set_cpu_isa("sse9"), r"unknown CPU ISA level 'sse9'; expected default, avx2 or avx512"),
    ],
    ids=["rank-2", "float64", "groups-not-dividing", "not-dense", "weight-size", "bias-dtype", "eps",
         "mean-shape", "dy-shape", "unknown-isa"],
)
def test_cpp_input_checks_name_the_bad_value(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.osp_C)


@needs_ext
def test_every_built_isa_is_listed_and_the_choice_is_restored():
    meta = _ext.METADATA
    assert meta["cpu_isas"][0] == "default" and set(_ext.cpu_isas()) <= set(meta["cpu_isas"])
    assert _ext.cpu_isa() == _ext.cpu_isas()[-1]  # automatic: the best usable level
    for level in _ext.cpu_isas():
        assert _ext.set_cpu_isa(level) == _ext.cpu_isa() == level
    assert _ext.set_cpu_isa("") == _ext.cpu_isas()[-1]


# ----------------------------------------------------------------------------- loading and building

def test_metadata_of_another_torch_is_refused_before_loading(tmp_path):
    """The check runs before the library is opened: a garbage file with mismatched metadata is
    refused for the torch version, never loaded."""
    lib = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"not a shared library")
    (tmp_path / "_C.json").write_text(json.dumps({"torch": "1.0.0", "cpu_isas": ["default"], "ops": {}}))
    ok, reason, meta = _ext.load(lib)
    assert not ok and meta["torch"] == "1.0.0"
    assert f"built against torch 1.0.0 but torch {torch.__version__} is installed" in reason and "rebuild" in reason
    assert _ext.check_metadata({"torch": torch.__version__, "cxx11_abi": not torch._C._GLIBCXX_USE_CXX11_ABI}) \
        .startswith("osp._C was built with _GLIBCXX_USE_CXX11_ABI")
    assert _ext.check_metadata({"torch": torch.__version__}) is None


def test_a_library_without_metadata_or_that_fails_to_load_is_a_reason_not_an_error(tmp_path):
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"not a shared library")
    ok, reason, _ = _ext.load(lib)
    assert not ok and "has no build metadata (_C.json)" in reason
    (tmp_path / "_C.json").write_text(json.dumps({"torch": torch.__version__}))
    ok, reason, _ = _ext.load(lib)
    assert not ok and reason.startswith(f"osp._C at {lib} failed to load: OSError")


def test_missing_extension_costs_one_warning_and_a_fallback(monkeypatch):
    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "REASON", "osp._C is not built (test)")
    monkeypatch.setattr(_ext, "_WARNED", False)
    x = torch.randn(2, 8, 3, 4, device=DEVICE)
    with pytest.warns(RuntimeWarning, match=r"osp._C is not built \(test\); osp uses its other backends") as record:
        for _ in range(3):
            out = group_norm(x, 4, act="silu")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, group_norm(x, 4, act="silu", backend="torch"))
    with pytest.raises(osp.ops.BackendUnavailable, match="ext: osp._C is not built"):
        group_norm(x, 4, backend="ext")
    assert "compiled extension osp._C: not used: osp._C is not built (test)" in osp.cli.info.info()


@needs_ext
def test_info_prints_the_build_metadata_and_the_ops_served():
    import osp.cli.info

    text = osp.cli.info.info()
    assert f"built against torch {torch.__version__}" in text
    assert re.search(r"CPU ISA levels built: default(, avx2)?(, avx512)?; usable here: .*; active: \w+", text)
    assert "ops served: CPU: group_norm_act, group_norm_act_backward, group_norm_act_," in text


@pytest.fixture
def setup_module_(monkeypatch):
    spec = importlib.util.spec_from_file_location("osp_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines, does not build: setup() runs only as __main__
    return module


def test_build_switches(setup_module_, monkeypatch):
    monkeypatch.setenv("OSP_BUILD_EXT", "0")
    assert setup_module_.extension_modules() == ([], {})
    monkeypatch.setenv("OSP_BUILD_EXT", "2")
    with pytest.raises(SystemExit, match="OSP_BUILD_EXT='2'"):
        setup_module_.extension_modules()
    monkeypatch.setenv("OSP_BUILD_EXT", "auto")
    monkeypatch.setenv("OSP_CPU_ISAS", "avx512")
    if setup_module_.platform.machine().lower() in ("x86_64", "amd64"):
        assert setup_module_._cpu_isas() == ["default", "avx512"]  # default is always built
        monkeypatch.setenv("OSP_CPU_ISAS", "avx2,sse9")
        with pytest.raises(SystemExit, match="OSP_CPU_ISAS names 'sse9'"):
            setup_module_._cpu_isas()
    monkeypatch.delenv("OSP_CPU_ISAS")
    served = setup_module_._served_ops(["csrc/bindings.cpp"])
    assert {"group_norm_act", "group_norm_act_backward", "group_norm_act_"} <= set(served["CPU"])
    assert setup_module_._served_ops(["csrc/group_norm/group_norm_cuda.cpp"]) == {
        "CUDA": ["group_norm_act", "group_norm_act_backward"]}


def test_cuda_build_switches(setup_module_, monkeypatch):
    monkeypatch.setenv("OSP_BUILD_CUDA", "maybe")
    with pytest.raises(SystemExit, match="OSP_BUILD_CUDA='maybe'"):
        setup_module_._cuda_mode()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup_module_._cuda_archs(torch) == "9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert setup_module_._cuda_archs(torch) == "8.0;8.6;8.9;9.0+PTX"
    if torch.version.cuda is None:  # a CPU torch: no CUDA half; forcing it is an error naming why
        monkeypatch.setenv("OSP_BUILD_EXT", "auto")
        monkeypatch.setenv("OSP_BUILD_CUDA", "auto")
        exts, _ = setup_module_.extension_modules()
        assert [e.name for e in exts] == ["osp._C"]
        assert not any(s.endswith(("_cuda.cpp", ".cu")) for s in exts[0].sources)
        monkeypatch.setenv("OSP_BUILD_CUDA", "1")
        with pytest.raises(SystemExit, match="OSP_BUILD_CUDA=1 but torch is a CPU build"):
            setup_module_.extension_modules()


def test_a_refused_cuda_half_leaves_the_cpu_half(tmp_path):
    lib = tmp_path / "_C_cuda.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"not a shared library")
    (tmp_path / "_C_cuda.json").write_text(json.dumps({"torch": "0.1", "ops": {"CUDA": ["group_norm_act"]}}))
    meta = {"torch": torch.__version__, "ops": {"CPU": ["group_norm_act"]}}
    with pytest.warns(RuntimeWarning, match="built against torch 0.1"):
        merged = _ext._load_cuda_part(lib, meta)
    assert merged["ops"] == {"CPU": ["group_norm_act"]} and "built against torch 0.1" in merged["cuda_reason"]


def test_without_torch_at_build_time_the_package_is_pure_python(setup_module_, monkeypatch, capsys):
    """An isolated `pip install .` has no torch while building: no extension, and a message on how to
    build it; OSP_BUILD_EXT=1 makes that an error."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setenv("OSP_BUILD_EXT", "auto")
    assert setup_module_.extension_modules() == ([], {})
    assert "torch is not importable at build time" in capsys.readouterr().err
    monkeypatch.setenv("OSP_BUILD_EXT", "1")
    with pytest.raises(SystemExit, match="--no-build-isolation"):
        setup_module_.extension_modules()


def test_cuda_twin_compiles_for_sm90_with_nvcc():
    """csrc/**/*_cuda.cu are free of ATen: nvcc alone compiles them for sm_90, no GPU or CUDA torch."""
    import subprocess

    sys.path.insert(0, str(ROOT))
    try:
        from bench.compile_check import nvcc_path
    finally:
        sys.path.remove(str(ROOT))
    if nvcc_path() is None:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME, or pip install nvidia-cuda-nvcc-cu12)")
    out = subprocess.run([sys.executable, "-m", "bench.compile_check", "--nvcc", "--arch", "90"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "group_norm_cuda.cu sm_90: ok" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or _ext.why_not("group_norm_act", "cuda") is not None,
                    reason=f"no CUDA half of osp._C here: {_ext.METADATA.get('cuda_reason', 'not built')}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape,groups,layout", cases(), ids=case_ids())
def test_cuda_twin_matches_reference(shape, groups, layout, dtype):
    """On a GPU machine with osp._C_cuda built (make gpu-check): the same parity rule on CUDA."""
    check_against_reference(shape, groups, layout, dtype, backend="ext")


@needs_ext
def test_osp_cpu_isa_environment_variable_forces_a_level():
    """OSP_CPU_ISA is read when the library loads; an unusable level is a reason, not a crash."""
    import os
    import subprocess

    code = "from osp.ops import _ext; print(_ext.AVAILABLE, _ext.cpu_isa(), '|', _ext.REASON)"
    env = dict(os.environ, OSP_CPU_ISA="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[:2] == ["True", "default"], out.stdout + out.stderr
    env["OSP_CPU_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("False None | OSP_CPU_ISA='sse9': osp_C: unknown CPU ISA level 'sse9'"), out.stdout


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP is built in on Linux")
def test_kernels_run_on_torch_openmp_runtime():
    """at::parallel_for is inline OpenMP: the library is built with -fopenmp (else every kernel runs on
    one thread) and binds to the libgomp torch loaded, so there is one OpenMP runtime in the process and
    torch.set_num_threads governs the kernels."""
    assert _ext.METADATA.get("openmp") is True, _ext.METADATA
    with open("/proc/self/maps", encoding="utf-8") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp
