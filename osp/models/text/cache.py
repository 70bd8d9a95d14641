"""On-disk cache of caption embeddings, so training encodes each caption once.

One safetensors file per (encoder, caption): the name is the SHA-256 of the encoder's identity and
the caption text, the file holds the caption's states at its tokens only (n_tokens, C) and, in its
metadata, the identity and caption (checked on read, so a hash collision is a miss, never a wrong
answer). Writes are atomic: a temporary file in the same folder, then os.replace, so a reader or a
crashed writer never leaves a partial file under the final name, and concurrent writers of the
same caption are harmless (the last complete file wins; both hold the same values).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Dict, Optional, Tuple, Union

import torch

from .base import Captions, TextEncoder, caption_list

logger = logging.getLogger(__name__)


class TextEmbeddingCache:
    """Caption states of one encoder under ``root/<key[:2]>/<key>.safetensors``.

    Args:
        root: cache folder (created on first write).
        identity: the encoder's identity string (``encoder.identity``); part of every key.
    """

    def __init__(self, root: Union[str, os.PathLike], identity: str):
        if not isinstance(identity, str) or not identity:
            raise ValueError(f"TextEmbeddingCache: identity={identity!r}; expected the encoder's identity string")
        self.root = os.fspath(root)
        self.identity = identity

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.identity}\x00{caption}".encode("utf-8")).hexdigest()

    def path(self, caption: str) -> str:
        key = self.key(caption)
        return os.path.join(self.root, key[:2], key + ".safetensors")

    def get(self, caption: str) -> Optional[torch.Tensor]:
        """The cached (n_tokens, C) states of ``caption`` on CPU, or None."""
        from safetensors import safe_open

        path = self.path(caption)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("identity") != self.identity or meta.get("caption") != caption:
                    return None
                return f.get_tensor("states")
        except Exception as exc:  # an unreadable file is a miss; the next put replaces it
            logger.warning("text cache: ignoring unreadable %s (%s)", path, exc)
            return None

    def put(self, caption: str, states: torch.Tensor) -> str:
        """Store (n_tokens, C) states for ``caption`` atomically; returns the file's path."""
        from safetensors.torch import save_file

        if not isinstance(states, torch.Tensor) or states.dim() != 2:
            raise ValueError(f"TextEmbeddingCache.put: states must be (n_tokens, C), got "
                             f"{tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__}")
        path = self.path(caption)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"states": states.detach().to("cpu").contiguous()}, tmp,
                      metadata={"identity": self.identity, "caption": caption})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path


class CachedTextEncoder(TextEncoder):
    """Any osp caption encoder behind a TextEmbeddingCache: the same call, encoding only the
    captions not cached yet (each distinct one once per call) and storing them.

    ``misses`` counts the captions encoded, ``hits`` the captions served without encoding (a caption
    repeated within one call is encoded once and counted as a hit after the first).

    The cache holds the states at caption tokens only, at the encoder's ``max_length``: a call with
    ``raw=True`` (states at the padded positions too) or another ``max_length`` goes to the wrapped
    encoder uncached (it must accept those arguments, as osp's encoders do).
    """

    def __init__(self, encoder: TextEncoder, cache_dir: Union[str, os.PathLike]):
        self.encoder = encoder
        self.cache = TextEmbeddingCache(cache_dir, encoder.identity)
        self.max_length, self.out_channels, self.identity = encoder.max_length, encoder.out_channels, encoder.identity
        self.hits = self.misses = 0

    def to(self, device) -> "CachedTextEncoder":
        """Move the wrapped encoder (when it can move) to ``device``; returns self."""
        if callable(getattr(self.encoder, "to", None)):
            self.encoder.to(device)
        return self

    def encode(self, captions: Captions, *, max_length: Optional[int] = None,
               raw: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        if raw or (max_length is not None and max_length != self.max_length):
            return self.encoder.encode(captions, max_length=max_length, raw=raw)
        caps = caption_list(captions)
        found: Dict[str, torch.Tensor] = {}
        for c in dict.fromkeys(caps):
            s = self.cache.get(c)
            if s is not None:
                found[c] = s
        todo = [c for c in dict.fromkeys(caps) if c not in found]
        device = dtype = None
        if todo:
            states, mask = self.encoder.encode(todo)
            device, dtype = states.device, states.dtype
            for c, s, m in zip(todo, states, mask):
                found[c] = s[: int(m.sum())]
                self.cache.put(c, found[c])
        self.misses += len(todo)
        self.hits += len(caps) - len(todo)
        if device is None:
            device, dtype = getattr(self.encoder, "device", "cpu"), getattr(self.encoder, "dtype", None)
        L, C = self.max_length, self.out_channels
        any_states = next(iter(found.values()))
        dtype = dtype or any_states.dtype
        out = torch.zeros(len(caps), L, C, dtype=dtype, device=device)
        mask = torch.zeros(len(caps), L, dtype=torch.long, device=device)
        for i, c in enumerate(caps):
            s = found[c]
            out[i, : s.shape[0]] = s.to(device=device, dtype=dtype)
            mask[i, : s.shape[0]] = 1
        return out, mask
