"""Caption encoders: T5 (local weights, optional transformers), a tiny built-in one, and an
on-disk embedding cache. Each returns (states (b, max_length, C), mask (b, max_length))."""
from .base import MissingWeightsError, TextEncoder
from .cache import CachedTextEncoder, TextEmbeddingCache
from .t5 import T5_MAX_LENGTH, T5TextEncoder
from .tiny import TinyTextEncoder

__all__ = ["CachedTextEncoder", "MissingWeightsError", "T5TextEncoder", "T5_MAX_LENGTH", "TextEmbeddingCache",
           "TextEncoder", "TinyTextEncoder"]
