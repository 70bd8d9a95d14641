"""T5 caption encoder (Open-Sora-Plan v1.0 uses the T5 v1.1 XXL encoder: 4096-d states, 300 tokens).

Loads only from a local directory (transformers' ``local_files_only``): osp never downloads the
encoder. Needs the optional ``transformers`` and ``sentencepiece`` packages (``pip install
'osp[text]'``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Tuple, Union

import torch

from .base import Captions, MissingWeightsError, TextEncoder, call_length, caption_list, zero_padding

T5_MAX_LENGTH = 300
_INSTALL_HINT = ("T5TextEncoder needs the optional packages transformers and sentencepiece: "
                 "pip install 'osp[text]' (or: pip install transformers sentencepiece protobuf)")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return transformers


def _check_dir(path: str, what: str, needed: Tuple[str, ...]) -> str:
    path = os.path.expanduser(os.fspath(path))
    hint = ("pass the local directory of a T5 v1.1 XXL encoder (config.json, its weights and spiece.model or "
            "tokenizer.json; for example a download of the Hugging Face repo DeepFloyd/t5-v1_1-xxl). "
            "osp never downloads it")
    if not os.path.isdir(path):
        raise MissingWeightsError(f"T5TextEncoder: {what} directory {path!r} does not exist; {hint}")
    if needed and not any(os.path.isfile(os.path.join(path, n)) for n in needed):
        raise MissingWeightsError(f"T5TextEncoder: {path!r} has none of {list(needed)} ({what}); {hint}")
    return path


def _fingerprint(path: str) -> str:
    """Hash of the directory's config and the names and sizes of its files (cheap: nothing is read
    but config.json), so a different checkpoint under the same name gives another identity."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(f"{name}:{os.path.getsize(full)};".encode())
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


class T5TextEncoder(TextEncoder):
    """transformers' T5EncoderModel and tokenizer from a local directory.

    Args:
        path: directory of the encoder (config.json and weights; T5ForConditionalGeneration weights
            work too, the decoder's are ignored).
        tokenizer_path: directory of the tokenizer (default: ``path``).
        max_length: tokens per caption; longer captions are truncated, shorter ones padded (300).
        dtype: weights and output dtype (bfloat16, as upstream trains).
        device: where the encoder runs.

    ``encoder(captions)`` -> (states (b, max_length, d_model), mask (b, max_length) int64): the
    tokenizer's end token is appended, padded positions of states are zero.
    ``encoder.encode(captions, max_length=L, raw=True)``: L tokens for this call, and T5's own
    hidden states at the padded positions (the encoder runs with the mask either way).
    """

    def __init__(self, path: Union[str, os.PathLike], *, tokenizer_path: Optional[Union[str, os.PathLike]] = None,
                 max_length: int = T5_MAX_LENGTH, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu"):
        if not (isinstance(max_length, int) and max_length > 0):
            raise ValueError(f"T5TextEncoder: max_length={max_length!r}; expected a positive int")
        path = _check_dir(path, "encoder", ("config.json",))
        tok_path = _check_dir(tokenizer_path or path, "tokenizer",
                              ("spiece.model", "tokenizer.json", "tokenizer_config.json"))
        transformers = _transformers()
        from packaging.version import Version

        # transformers renamed torch_dtype to dtype in 4.56.
        dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        self.model = transformers.T5EncoderModel.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=True, **{dtype_kw: dtype}).to(device).eval()
        self.model.requires_grad_(False)
        self.max_length, self.dtype, self.device = max_length, dtype, torch.device(device)
        self.out_channels = int(self.model.config.d_model)
        self.identity = json.dumps({
            "encoder": "T5TextEncoder", "name": os.path.basename(os.path.normpath(path)),
            "weights": _fingerprint(path), "tokenizer": _fingerprint(tok_path), "max_length": max_length,
            "dtype": str(dtype).replace("torch.", ""),
        }, sort_keys=True)

    def tokenize(self, captions: Captions, max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (b, L) int64 on the encoder's device; L = max_length or
        the encoder's max_length."""
        L = call_length(type(self).__name__, max_length, self.max_length)
        tok = self.tokenizer(caption_list(captions), max_length=L, padding="max_length",
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, captions: Captions, *, max_length: Optional[int] = None,
               raw: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions, max_length)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (states if raw else zero_padding(states, mask)), mask.long()

    def to(self, device: Union[str, torch.device]) -> "T5TextEncoder":
        """Move the encoder (and where its outputs go) to ``device``; returns self."""
        self.model.to(device)
        self.device = torch.device(device)
        return self
