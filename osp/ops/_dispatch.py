"""Explicit, explainable backend dispatch (the xformers pattern).

Every op owns an ordered list of backends. For a given call each backend answers "why not?"
(a reason string, or None when it can run); the first with no reason runs. A backend is forced,
in decreasing precedence, by the ``backend=`` argument of the call, by the ``use_backend`` context
manager, or by the ``OSP_BACKEND`` environment variable, whose value is either one backend name for
every op that has it (``OSP_BACKEND=torch``) or a comma list of ``op=backend`` pairs
(``OSP_BACKEND=group_norm=triton,attention=torch``). Forcing a backend that cannot run this call
raises BackendUnavailable listing every backend's reason. The choice is logged once per
(op, backend) on the ``osp.ops`` logger.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import logging
import os
from types import MappingProxyType
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

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


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> Dict[str, str]:
    """'torch' -> {'*': 'torch'}; 'group_norm=triton,attention=torch' -> per-op mapping."""
    out: Dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        op, sep, name = item.partition("=")
        if sep:
            out[op.strip()] = name.strip()
        else:
            out["*"] = op
    return out


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block.

    ``use_backend("torch")`` forces it for every op that has a backend of that name;
    ``use_backend(group_norm="triton")`` forces it for one op. Nested blocks override outer ones.
    """
    current = dict(_OVERRIDE.get())
    if backend is not None:
        current = {k: v for k, v in current.items() if k != "*"}
        current["*"] = backend
    current.update(per_op)
    known = set(BACKEND_NAMES).union(*(op.backends for op in _REGISTRY.values()))
    for op, name in current.items():
        if name not in known:
            raise ValueError(f"unknown backend {name!r} for {op if op != '*' else 'all ops'}; expected one of {sorted(known)}")
    token = _OVERRIDE.set(current)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


class Op:
    """An op with ordered backends; call ``op.dispatch(args, kwargs, backend)``."""

    def __init__(self, name: str, backends: List[Backend], probe: Optional[Callable] = None):
        """``probe(device, dtype) -> (args, kwargs)`` builds a small typical call, so that
        ``osp info`` can ask every backend whether it would run here."""
        self.name = name
        self.backends = {b.name: b for b in backends}
        self.probe = probe
        _REGISTRY[name] = self

    def _forced(self, backend: Optional[str]) -> Optional[str]:
        """The backend asked for by argument, context or environment; None for automatic choice."""
        if backend is not None:
            if backend not in self.backends:
                raise ValueError(
                    f"osp.ops.{self.name}: unknown backend {backend!r}; expected one of {tuple(self.backends)}"
                )
            return backend
        for source in (_OVERRIDE.get(), _parse_env(os.environ.get("OSP_BACKEND", ""))):
            if self.name in source:
                name = source[self.name]
                if name not in self.backends:
                    raise ValueError(
                        f"osp.ops.{self.name}: unknown backend {name!r} in OSP_BACKEND or use_backend; "
                        f"expected one of {tuple(self.backends)}"
                    )
                return name
            # A global choice applies to the ops that have such a backend; others choose freely.
            if source.get("*") in self.backends:
                return source["*"]
        return None

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
            chosen, why = self.backends[forced], "forced"
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
            why = "; ".join(f"{n} skipped: {r}" for n, r in reasons.items()) or "first choice"
        key = (self.name, chosen.name)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info("osp.ops.%s -> %s (%s)", self.name, chosen.name, why)
        return chosen

    def dispatch(self, args: tuple, kwargs: dict, backend: Optional[str] = None):
        return self.select(args, kwargs, backend).run(*args, **kwargs)


def registered_ops() -> Dict[str, Op]:
    return dict(_REGISTRY)
