"""What every osp caption encoder provides, and the errors they raise."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

Captions = Union[str, Sequence[str]]


class MissingWeightsError(FileNotFoundError, ValueError):
    """A text encoder's local weights are not where the caller said (osp never downloads them).
    It is both a FileNotFoundError and a ValueError (a bad path argument)."""


def caption_list(captions: Captions) -> List[str]:
    """One caption or a sequence of them as a list of str; ValueError for anything else."""
    if isinstance(captions, str):
        return [captions]
    if isinstance(captions, (list, tuple)) and captions and all(isinstance(c, str) for c in captions):
        return list(captions)
    raise ValueError(f"captions={captions!r:.80}; expected a str or a non-empty list of str")


class TextEncoder:
    """Interface of the caption encoders (T5TextEncoder, TinyTextEncoder, CachedTextEncoder).

    ``encoder(captions)`` returns ``(states, mask)``: states (b, max_length, out_channels) in the
    encoder's dtype, with the padded positions set to zero (they never influence LatteT2V: the
    cross-attention masks them), and mask (b, max_length) int64, 1 for caption tokens (the end
    token included) and 0 for padding. ``identity`` names the encoder and everything that changes its
    output (weights, tokenizer, max_length, dtype); caches key on it.

    ``encoder.encode(captions, max_length=L, raw=True)`` tokenizes to L tokens for this call only
    (default: the encoder's ``max_length``) and, with ``raw=True``, keeps the encoder's real
    hidden states at the padded positions (upstream's sampling pipeline feeds some of them to
    LatteT2V unmasked: the negative prompt's pad states, spec B.4).
    """

    max_length: int
    out_channels: int
    identity: str

    def encode(self, captions: Captions, *, max_length: Optional[int] = None,
               raw: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, captions: Captions, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions, **kwargs)


def zero_padding(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """states (b, L, C) with the positions where mask (b, L) is 0 set to zero."""
    return states * mask[..., None].to(states.dtype)


def call_length(encoder_name: str, max_length: Optional[int], default: int) -> int:
    """The token count of one encode call: ``max_length`` if given (a positive int), else ``default``."""
    if max_length is None:
        return default
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise ValueError(f"{encoder_name}.encode: max_length={max_length!r}; expected a positive int or None")
    return max_length
