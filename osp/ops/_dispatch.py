"""Explicit, explainable backend dispatch (the xformers pattern).

Every op owns an ordered list of backends. For a given call each backend answers "why not?"
(a reason string, or None when it can run); the first with no reason runs. A backend is forced,
in decreasing precedence, by the ``backend=`` argument of the call, by the ``use_backend`` context
manager, or by the ``OSP_BACKEND`` environment variable, whose value is either one backend name for
every op that has it (``OSP_BACKEND=torch``) or a comma list of ``name=backend`` pairs
(``OSP_BACKEND=group_norm=triton,attention=torch``). A name is an op or a group: the file an op
lives in (``modulation`` holds layer_norm_modulate and gated_residual, ``tile_blend`` holds
blend_tile_ and blend_normalize_). An op's own name takes precedence over its group's; a group's
choice, like a global one, applies to those of its ops that have that backend. Unknown names and
backends are ValueErrors. Forcing a backend that cannot run this call raises BackendUnavailable
listing every backend's reason. The choice is logged once per (op, backend) on the ``osp.ops``
logger.

torch.compile: ``Op.dispatch`` traces without graph breaks (``torch.compile(fullgraph=True)``). The
choice forced by the context manager or the environment is read by ``_context_choice``, which Dynamo
runs once while tracing and treats as a constant (``osp._utils.trace_constant``, as
``torch.compiler.assume_constant_result`` marks it), so a compiled function keeps the choice in force
when it was compiled; the backends' ``why_not`` checks are plain Python on tensor metadata, which
Dynamo traces (and guards); nothing is logged while compiling.

Autocast: an op declares the policy of its torch counterpart (``osp.ops._dtypes``); ``Op.autocast``
casts its inputs accordingly, and ``Op.dispatch`` runs the backend with autocast off.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import logging
import os
from types import MappingProxyType
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch

from .._utils import autocast_dtype, no_autocast_anywhere, trace_constant

logger = logging.getLogger("osp.ops")

BACKEND_NAMES = ("triton", "ext", "torch")  # common to most ops; an op may add its own (flash_attn, ...)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the call; the message lists every backend's reason."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``why_not(*args, forced=..., **kwargs)`` returns None when the backend can run the call, else
    a short human reason. ``forced`` is True when the user asked for this backend by name: a
    backend that is correct but pointless to pick automatically (the Triton interpreter on CPU)
    declines only when not forced.
    """

    name: str
    run: Callable
    why_not: Callable[..., Optional[str]]


# Read-only mapping: use_backend sets a fresh dict, never mutates the current one.
_OVERRIDE: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("osp_backend_override",
                                                                          default=MappingProxyType({}))
_REGISTRY: Dict[str, "Op"] = {}
_LOGGED: set = set()


def _validate(choices: Mapping[str, str], where: str) -> None:
    """ValueError for a name that is no op or group, or a backend that name cannot have."""
    groups: Dict[str, set] = {}
    for op in _REGISTRY.values():
        groups.setdefault(op.group, set()).update(op.backends)
    known = set(BACKEND_NAMES).union(*groups.values())
    for key, name in choices.items():
        if key == "*":
            allowed, what = known, "all ops"
        elif key in _REGISTRY:  # an op's own name: one of its backends
            allowed, what = set(_REGISTRY[key].backends), f"op {key}"
        elif key in groups:
            allowed, what = groups[key], f"the ops of {key}"
        else:
            names = sorted(set(_REGISTRY) | set(groups))
            raise ValueError(f"unknown op {key!r} in {where}; expected an op or file name: {', '.join(names)}")
        if name not in allowed:
            raise ValueError(f"unknown backend {name!r} for {what} in {where}; expected one of {sorted(allowed)}")


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> Dict[str, str]:
    """'torch' -> {'*': 'torch'}; 'group_norm=triton,modulation=torch' -> per-name mapping (validated)."""
    out: Dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        op, sep, name = item.partition("=")
        if sep:
            out[op.strip()] = name.strip()
        else:
            out["*"] = op
    _validate(out, f"OSP_BACKEND={value!r}")
    return out


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block.

    ``use_backend("torch")`` forces it for every op that has a backend of that name;
    ``use_backend(group_norm="triton")`` forces it for one op, ``use_backend(modulation="triton")``
    for the ops of modulation.py that have it. Nested blocks override outer ones.
    """
    current = dict(_OVERRIDE.get())
    if backend is not None:
        current["*"] = backend
    current.update(per_op)
    _validate(current, "use_backend")
    token = _OVERRIDE.set(current)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


@trace_constant
def _context_choice(name: str, group: str, backends: tuple) -> Optional[str]:
    """The backend that ``use_backend`` or ``OSP_BACKEND`` forces on op ``name`` (of file ``group``,
    with ``backends``), else None. Under torch.compile, evaluated once at trace time (a constant)."""
    override, env = _OVERRIDE.get(), os.environ.get("OSP_BACKEND")
    if not override and not env:  # the common case, on every call: nothing forced
        return None
    for source in (override, _parse_env(env or "")):
        if name in source:  # validated: one of this op's backends
            return source[name]
        # A group's or a global choice applies to the ops that have such a backend; others choose freely.
        for key in (group, "*"):
            if source.get(key) in backends:
                return source[key]
    return None


AutocastPolicy = Callable[[str, torch.dtype], Optional[torch.dtype]]


class Op:
    """An op with ordered backends; call ``op.autocast(...)`` on its tensors, validate, then
    ``op.dispatch(args, kwargs, backend)``."""

    def __init__(self, name: str, backends: List[Backend], probe: Optional[Callable] = None, *,
                 group: Optional[str] = None, autocast: Optional[AutocastPolicy] = None):
        """``probe(device, dtype) -> (args, kwargs)`` builds a small typical call, so that
        ``osp info`` can ask every backend whether it would run here. ``group``: the name of the
        op's file when it differs from the op's (several ops in one file). ``autocast(device_type,
        autocast_dtype)``: the dtype torch.autocast casts the op's torch counterpart to, or None
        (see osp.ops._dtypes); None for an op autocast does not touch."""
        self.name = name
        self.group = group or name
        self.backends = {b.name: b for b in backends}
        self.probe = probe
        self.autocast_policy = autocast
        _REGISTRY[name] = self

    def _forced(self, backend: Optional[str]) -> Optional[str]:
        """The backend asked for by argument, context or environment; None for automatic choice."""
        if backend is not None:
            if backend not in self.backends:
                raise ValueError(
                    f"osp.ops.{self.name}: unknown backend {backend!r}; expected one of {tuple(self.backends)}"
                )
            return backend
        return _context_choice(self.name, self.group, tuple(self.backends))

    def autocast(self, *tensors):
        """``tensors`` as torch.autocast hands them to this op's torch counterpart: under autocast on
        a tensor's device, a floating tensor other than float64 is cast to the dtype of the op's
        policy. Anything else (None, ints, other dtypes, autocast off) passes through unchanged."""
        if self.autocast_policy is None or no_autocast_anywhere():
            return tensors
        out = []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                dtype = autocast_dtype(t.device.type)
                target = self.autocast_policy(t.device.type, dtype) if dtype is not None else None
                if target is not None:
                    t = t.to(target)
            out.append(t)
        return tuple(out)

    def explain(self, *args, **kwargs) -> Dict[str, Optional[str]]:
        """Each backend's reason for not running this call when chosen automatically (None = usable)."""
        return {name: b.why_not(*args, forced=False, **kwargs) for name, b in self.backends.items()}

    def select(self, args: tuple, kwargs: dict, backend: Optional[str] = None) -> Backend:
        forced = self._forced(backend)
        if forced is not None:
            reason = self.backends[forced].why_not(*args, forced=True, **kwargs)
            if reason is not None:
                reasons = {forced: reason}
                reasons.update(
                    (n, b.why_not(*args, forced=True, **kwargs) or "usable")
                    for n, b in self.backends.items() if n != forced
                )
                lines = "\n".join(f"  {n}: {r}" for n, r in reasons.items())
                raise BackendUnavailable(f"osp.ops.{self.name}: backend {forced!r} was forced but cannot run this call:\n{lines}")
            chosen, reasons = self.backends[forced], None
        else:
            reasons = {}
            for b in self.backends.values():
                reason = b.why_not(*args, forced=False, **kwargs)
                if reason is None:
                    chosen = b
                    break
                reasons[b.name] = reason
            else:  # the last backend is the reference, which runs anything valid
                raise BackendUnavailable(f"osp.ops.{self.name}: no backend can run this call: {reasons}")
        key = (self.name, chosen.name)
        if not torch.compiler.is_compiling() and key not in _LOGGED:
            _LOGGED.add(key)
            why = "forced" if reasons is None else (
                "; ".join(f"{n} skipped: {r}" for n, r in reasons.items()) or "first choice")
            logger.info("osp.ops.%s -> %s (%s)", self.name, chosen.name, why)
        return chosen

    def dispatch(self, args: tuple, kwargs: dict, backend: Optional[str] = None):
        """Run the chosen backend on validated args; args[0] is the main tensor. Under autocast the
        inputs were cast by ``autocast`` already, so the backend runs with autocast off."""
        device_type = args[0].device.type
        if no_autocast_anywhere() or autocast_dtype(device_type) is None:
            return self.select(args, kwargs, backend).run(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return self.select(args, kwargs, backend).run(*args, **kwargs)


def registered_ops() -> Dict[str, Op]:
    return dict(_REGISTRY)
