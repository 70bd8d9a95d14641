"""Exponential moving average of a model's trainable parameters, stepped every optimizer step.

Upstream's ``--use_ema`` wraps a copy of the model in diffusers' EMAModel and never steps it (spec
C.5, G11), so its "EMA" is the initial weights. This one is stepped after every optimizer step with
EMAModel's default decay schedule, so it is what upstream's would have been had it been stepped:
update n (1-based) uses

    decay_n = 0                                      for n = 1 (the first update copies the weights)
    decay_n = min(decay, (1 + m) / (10 + m)),  m = n - 1   afterwards,

and shadow <- decay_n * shadow + (1 - decay_n) * param, in float32 whatever the parameters' dtype.
The shadow tensors follow the parameter list they were made from (under FSDP: the local shards), so
a checkpoint of an EMA belongs to the same launcher and world size.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List

import torch


class EMA:
    """EMA of ``parameters`` (the trainable ones of the model being optimized).

    Args:
        parameters: the tensors to average (kept by reference; ``step()`` reads their current values).
        decay: the decay the schedule rises to (0.9999, diffusers' and upstream's default).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float = 0.9999):
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay < 1.0):
            raise ValueError(f"EMA: decay={decay!r}; expected a number in [0, 1)")
        self.parameters: List[torch.Tensor] = list(parameters)
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: List[torch.Tensor] = [p.detach().to(torch.float32, copy=True) for p in self.parameters]

    def current_decay(self) -> float:
        """The decay the next ``step()`` will use."""
        n = self.num_updates + 1
        if n <= 1:
            return 0.0
        m = n - 1
        return min(self.decay, (1 + m) / (10 + m))

    @torch.no_grad()
    def step(self) -> float:
        """Fold the parameters' current values into the average; returns the decay used."""
        d = self.current_decay()
        for s, p in zip(self.shadow, self.parameters):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.num_updates += 1
        return d

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA values (cast to their dtype); their own values
        come back afterwards, bit for bit."""
        saved = [p.detach().clone() for p in self.parameters]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.parameters):
                    p.copy_(s.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.parameters):
                    p.copy_(v)

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(f"EMA state of {len(shadow)} tensors does not match the model's {len(self.shadow)} "
                             "trainable parameters (shapes differ); expected a checkpoint of the same model, "
                             "launcher and number of processes")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)
