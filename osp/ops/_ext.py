"""The compiled extension ``osp._C``: found, checked, loaded once, and given autograd and fake kernels.

The library (built by setup.py from csrc/) registers its ops under ``torch.ops.osp_C`` when loaded
with ``torch.ops.load_library``; its build metadata, ``_C.json`` beside it, is read first, because
loading runs the op registration and a library built against another torch would crash there: such a
library is refused with a message instead. A missing, refused or failed library leaves
``AVAILABLE`` False with the reason in ``REASON``, and costs one warning the first time an op would
have used it (``warn_once``); nothing here raises.

Python-side registrations (torch.library): fake (meta) kernels for every op so that torch.compile and
FakeTensor can trace them, and autograd for the functional ``group_norm_act`` (its backward is the
op ``group_norm_act_backward``). The in-place ``group_norm_act_`` has none: torch refuses autograd on
a mutating op, so it is for inference only.

Which CPU ISA level runs: the best one built and supported by this CPU, or ``OSP_CPU_ISA``
(default, avx2, avx512) read when the library loads; ``set_cpu_isa`` changes it (tests force every
level in turn).
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HOW_TO_BUILD = ("build it with torch installed: `pip install --no-build-isolation -e .` in the osp checkout "
                "(`make test` does), with a C++ compiler and ninja")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

AVAILABLE: bool = False
REASON: Optional[str] = "not loaded yet"
METADATA: Dict = {}
LIBRARY: Optional[Path] = None
_WARNED = False
_REGISTERED = False


def library_path(name: str = "_C") -> Optional[Path]:
    """Where osp.<name>'s shared library is (beside this osp package's __init__), or None when it was
    not built: ``_C`` (schemas, CPU kernels) or ``_C_cuda`` (CUDA kernels for the same schemas)."""
    package = Path(__file__).resolve().parents[1]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (package / f"{name}{suffix}").is_file():
            return package / f"{name}{suffix}"
    return None


def check_metadata(meta: Dict, torch_version: str = torch.__version__,
                   cxx11_abi: bool = bool(torch._C._GLIBCXX_USE_CXX11_ABI)) -> Optional[str]:
    """Why a library with build metadata ``meta`` must not be loaded into this process, or None."""
    built = meta.get("torch")
    if built != torch_version:
        return (f"osp._C was built against torch {built} but torch {torch_version} is installed; "
                f"loading it could crash, so it is refused: rebuild it ({HOW_TO_BUILD})")
    if "cxx11_abi" in meta and bool(meta["cxx11_abi"]) != cxx11_abi:
        return (f"osp._C was built with _GLIBCXX_USE_CXX11_ABI={int(meta['cxx11_abi'])} but this torch uses "
                f"{int(cxx11_abi)}; rebuild it ({HOW_TO_BUILD})")
    return None


def read_metadata(library: Path) -> Tuple[Optional[Dict], Optional[str]]:
    """(metadata, None) from the <name>.json beside ``library`` (_C.json for _C.*.so), else (None, why not)."""
    path = library.with_name(library.name.split(".")[0] + ".json")
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, (f"osp.{library.name.split('.')[0]} at {library} has no build metadata ({path.name}) beside it, "
                      f"so it is refused; rebuild it ({HOW_TO_BUILD})")
    except (OSError, ValueError) as exc:
        return None, f"osp._C's build metadata {path} is unreadable ({exc}); rebuild it ({HOW_TO_BUILD})"


def load(library: Optional[Path] = None) -> Tuple[bool, Optional[str], Dict]:
    """Check and load the library (``library_path()`` by default): (loaded, why not, metadata)."""
    library = library if library is not None else library_path()
    if library is None:
        return False, f"osp._C is not built (a pure-Python install); {HOW_TO_BUILD}", {}
    meta, reason = read_metadata(library)
    if meta is None:
        return False, reason, {}
    reason = check_metadata(meta)
    if reason is not None:
        return False, reason, meta
    try:
        torch.ops.load_library(str(library))
    except Exception as exc:  # a broken build costs a fallback, never an ImportError
        return False, f"osp._C at {library} failed to load: {type(exc).__name__}: {exc}", meta
    if not hasattr(torch.ops.osp_C, "group_norm_act"):
        return False, f"osp._C at {library} registered no ops", meta
    wanted = os.environ.get("OSP_CPU_ISA", "").strip().lower()
    try:
        torch.ops.osp_C.set_cpu_isa(wanted)
    except RuntimeError as exc:
        return False, f"OSP_CPU_ISA={wanted!r}: {exc}".splitlines()[0], meta
    cuda_library = library_path("_C_cuda") if library == library_path() else None
    if cuda_library is not None:
        meta = _load_cuda_part(cuda_library, meta)
    _register_python_parts()
    return True, None, meta


def _load_cuda_part(library: Path, meta: Dict) -> Dict:
    """Load osp._C_cuda (CUDA kernels for osp._C's schemas) and merge its ops into ``meta``; a refused
    or failed CUDA half leaves the CPU half working and says why in meta["cuda_reason"]."""
    cuda_meta, reason = read_metadata(library)
    if cuda_meta is not None:
        reason = check_metadata(cuda_meta)
    if reason is None:
        try:
            torch.ops.load_library(str(library))
        except Exception as exc:
            reason = f"osp._C_cuda at {library} failed to load: {type(exc).__name__}: {exc}"
    if reason is not None:
        warnings.warn(f"{reason}; the CUDA ops use their other backends", RuntimeWarning, stacklevel=2)
        return dict(meta, cuda_reason=reason)
    ops = dict(meta.get("ops", {}))
    ops.update(cuda_meta.get("ops", {}))
    return dict(meta, ops=ops, cuda=True, cuda_archs=cuda_meta.get("cuda_archs", []),
                cuda_version=cuda_meta.get("cuda_version"))


def warn_once() -> None:
    """One warning per process when the extension is missing or refused (call outside tracing)."""
    global _WARNED
    if not AVAILABLE and not _WARNED:
        _WARNED = True
        warnings.warn(f"{REASON}; osp uses its other backends", RuntimeWarning, stacklevel=2)


def why_not(op: str, device_type: str) -> Optional[str]:
    """Why ``torch.ops.osp_C.<op>`` cannot run on ``device_type`` here, or None. The first time the
    extension is found missing (outside torch.compile's tracing), one warning."""
    if not AVAILABLE:
        if not torch.compiler.is_compiling():
            warn_once()
        return REASON
    key = _DEVICE_KEYS.get(device_type)
    served = METADATA.get("ops", {})
    if key is None or op not in served.get(key, ()):
        where = ", ".join(k for k, ops in served.items() if op in ops) or "no device"
        return f"osp._C serves {op} on {where}, not on {device_type}"
    return None


def cpu_isas() -> List[str]:
    """ISA levels built into osp._C and supported by this CPU, lowest first ([] when not loaded)."""
    return list(torch.ops.osp_C.cpu_isas()) if AVAILABLE else []


def cpu_isa() -> Optional[str]:
    """The ISA level the CPU kernels run at now (None when not loaded)."""
    return torch.ops.osp_C.cpu_isa() if AVAILABLE else None


def set_cpu_isa(name: str = "") -> str:
    """Run the CPU kernels at ISA level ``name`` ("" = the best usable one); returns the level now
    active. RuntimeError for a level not built or not supported by this CPU."""
    if not AVAILABLE:
        raise RuntimeError(REASON)
    return torch.ops.osp_C.set_cpu_isa(name)


def below_autograd():
    """A context in which osp_C ops dispatch straight to their kernels, below the Autograd key.

    Inside a torch.autograd.Function (osp.ops.modulation's eager ``ext`` path) the op's Python
    autograd kernel registered here would only add overhead (it measured about 17 us a call on
    CPU, as long as a small kernel itself); torch.compile traces the registered ops instead."""
    below = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    return below() if below is not None else contextlib.nullcontext()


def layer_norm_modulate_grads(dy, x, scale, mean, rstd, shift_rows: int, shift_dtype):
    """(dx, dshift, dscale) of osp_C::layer_norm_modulate, reduced to one row where shift or scale
    had one row for every batch entry."""
    dx, dshift, dscale = torch.ops.osp_C.layer_norm_modulate_backward(dy, x, scale, mean, rstd)
    if shift_rows == 1 and x.shape[0] != 1:
        dshift = dshift.sum(0, keepdim=True)
    if scale.shape[0] == 1 and x.shape[0] != 1:
        dscale = dscale.sum(0, keepdim=True)
    return dx, dshift.to(shift_dtype), dscale.to(scale.dtype)


def gated_residual_grads(dout, gate, y):
    """(dx, dgate, dy) of osp_C::gated_residual (x + gate * y)."""
    dy, dgate = torch.ops.osp_C.gated_residual_backward(dout, gate, y)
    if gate.shape[0] == 1 and y.shape[0] != 1:
        dgate = dgate.sum(0, keepdim=True)
    return dout, dgate.to(gate.dtype), dy


def _register_python_parts() -> None:
    global _REGISTERED
    if _REGISTERED:  # load() may run again (tests); torch.library refuses a second registration
        return
    _REGISTERED = True
    lib = "osp_C::"

    def fake(name):  # only for ops this build has (an older build may lack newer ones)
        def register(fn):
            if hasattr(torch.ops.osp_C, name):
                torch.library.register_fake(lib + name)(fn)
            return fn
        return register

    @fake("group_norm_act")
    def _(x, weight, bias, num_groups, eps, silu):
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @fake("group_norm_act_backward")
    def _(dy, x, weight, bias, mean, rstd, num_groups, silu, compute_dx):
        dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
        C = x.shape[1]
        return dx, x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)

    @fake("group_norm_act_")
    def _(x, weight, bias, num_groups, eps, silu):
        return None

    @fake("blend_tile_")
    def _(out, wsum, tile, offset, overlap_lo, overlap_hi):
        return None

    @fake("blend_normalize_")
    def _(out, wsum):
        return None

    @fake("layer_norm_modulate")
    def _(x, shift, scale, eps):
        stats = x.new_empty(x.shape[:2], dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @fake("layer_norm_modulate_backward")
    def _(dy, x, scale, mean, rstd):
        grad = x.new_empty((x.shape[0], x.shape[2]), dtype=torch.float32)
        return torch.empty_like(x), grad, torch.empty_like(grad)

    @fake("gated_residual")
    def _(x, gate, y):
        return torch.empty_like(x)

    @fake("gated_residual_backward")
    def _(dout, gate, y):
        return torch.empty_like(y), y.new_empty((y.shape[0], y.shape[2]), dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        x, weight, bias, num_groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu

    def backward(ctx, dy, dmean, drstd):  # mean and rstd are statistics, not differentiated through
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None:
            return None, None, None, None, None, None
        dx, dw, db = torch.ops.osp_C.group_norm_act_backward(dy, x, weight, bias, mean, rstd, ctx.num_groups,
                                                             ctx.silu, need_x)
        return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
                db.to(bias.dtype) if need_b else None, None, None, None)

    torch.library.register_autograd(lib + "group_norm_act", backward, setup_context=setup_context)

    def lnm_setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_rows, ctx.shift_dtype = shift.shape[0], shift.dtype

    def lnm_backward(ctx, dy, dmean, drstd):
        if dy is None:
            return None, None, None, None
        return layer_norm_modulate_grads(dy, *ctx.saved_tensors, ctx.shift_rows, ctx.shift_dtype) + (None,)

    def gated_setup_context(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(gate, y)

    def gated_backward(ctx, dout):
        return gated_residual_grads(dout, *ctx.saved_tensors)

    if hasattr(torch.ops.osp_C, "gated_residual"):
        torch.library.register_autograd(lib + "gated_residual", gated_backward, setup_context=gated_setup_context)
    if hasattr(torch.ops.osp_C, "layer_norm_modulate"):
        torch.library.register_autograd(lib + "layer_norm_modulate", lnm_backward, setup_context=lnm_setup_context)


AVAILABLE, REASON, METADATA = load()
LIBRARY = library_path() if AVAILABLE else None
