"""Caption encoders: the tiny built-in encoder (determinism, shapes, masks), the embedding cache
(hits without re-encoding, atomic writes, collisions), and the T5 wrapper (clear errors for a
missing path or package; a tiny local T5 end to end when transformers is installed)."""
import json
import os

import pytest
import torch

from osp.models.text import (
    CachedTextEncoder,
    MissingWeightsError,
    T5TextEncoder,
    TextEmbeddingCache,
    TinyTextEncoder,
)
from osp.models.text import cache as cache_module
from osp.models.text.tiny import tokenize_bytes

CAPTIONS = ["a red panda eats bamboo", "", "ünïcode ✓ caption " * 3]


def test_tiny_encoder_shapes_masks_and_zero_padding():
    enc = TinyTextEncoder(out_channels=24, width=32, layers=1, heads=2, max_length=40)
    states, mask = enc(CAPTIONS)
    assert states.shape == (3, 40, 24) and mask.shape == (3, 40) and mask.dtype == torch.long
    n_bytes = [len(c.encode("utf-8")) for c in CAPTIONS]
    assert mask.sum(1).tolist() == [min(n, 39) + 1 for n in n_bytes]  # bytes (truncated) + the end token
    assert torch.all(states[mask == 0] == 0) and torch.all(states[mask == 1].abs().sum(-1) > 0)
    # A long caption is truncated and still ends with the end token.
    ids, m = tokenize_bytes(["x" * 100], 40)
    assert ids[0, -1].item() == 1 and m.sum().item() == 40


def test_tiny_encoder_is_deterministic():
    torch.manual_seed(123)
    before = torch.rand(1)
    a = TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2, max_length=32)
    b = TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2, max_length=32)
    c = TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2, max_length=32, seed=1)
    sa, ma = a(CAPTIONS)
    sb, mb = b(CAPTIONS)
    assert torch.equal(sa, sb) and torch.equal(ma, mb)
    assert not torch.equal(sa, c(CAPTIONS)[0])
    assert a.identity == b.identity != c.identity
    # Each caption's states do not depend on the rest of the batch.
    torch.testing.assert_close(a(CAPTIONS[0])[0][0], sa[0], rtol=1e-6, atol=1e-6)
    # Building an encoder leaves the global RNG where it was.
    torch.manual_seed(123)
    TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2, max_length=32)
    assert torch.equal(torch.rand(1), before)


def test_tiny_encoder_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        TinyTextEncoder(width=30, heads=4)
    with pytest.raises(ValueError, match="captions"):
        TinyTextEncoder(max_length=8)(42)
    with pytest.raises(ValueError, match="captions"):
        TinyTextEncoder(max_length=8)([])


class CountingEncoder:
    """Wraps an encoder and counts the captions it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.max_length, self.out_channels, self.identity = inner.max_length, inner.out_channels, inner.identity
        self.device, self.dtype = inner.device, inner.dtype

    def encode(self, captions):
        self.seen.extend(captions)
        return self.inner.encode(captions)


def _tiny(**kw):
    return TinyTextEncoder(**{**dict(out_channels=16, width=32, layers=1, heads=2, max_length=48), **kw})


def test_cache_hits_do_not_re_encode(tmp_path):
    inner = _tiny()
    spy = CountingEncoder(inner)
    cached = CachedTextEncoder(spy, tmp_path)
    want_s, want_m = inner(CAPTIONS)
    _, m1 = cached([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[2]])
    assert sorted(spy.seen) == sorted(CAPTIONS)  # each distinct caption encoded once
    assert (cached.misses, cached.hits) == (3, 1)
    spy.seen.clear()
    s2, m2 = cached(list(reversed(CAPTIONS)))
    assert spy.seen == [] and cached.hits == 4
    torch.testing.assert_close(s2, want_s.flip(0), rtol=0, atol=0)
    assert torch.equal(m2, want_m.flip(0)) and torch.equal(m1[3], want_m[2])
    # A fresh process (a new wrapper on the same folder) hits too; another encoder does not.
    again = CachedTextEncoder(CountingEncoder(inner), tmp_path)
    again(CAPTIONS)
    assert again.hits == 3 and again.misses == 0
    other = CachedTextEncoder(CountingEncoder(_tiny(seed=7)), tmp_path)
    other(CAPTIONS)
    assert other.misses == 3


def test_cache_files_hold_only_the_caption_tokens(tmp_path):
    enc = _tiny()
    cache = TextEmbeddingCache(tmp_path, enc.identity)
    CachedTextEncoder(enc, tmp_path)([CAPTIONS[0]])
    stored = cache.get(CAPTIONS[0])
    assert stored.shape == (len(CAPTIONS[0]) + 1, 16)
    assert os.path.dirname(cache.path(CAPTIONS[0])).endswith(cache.key(CAPTIONS[0])[:2])


def test_cache_collision_or_corruption_is_a_miss(tmp_path):
    cache = TextEmbeddingCache(tmp_path, "enc-a")
    path = cache.put("caption one", torch.ones(3, 4))
    # Another caption whose file name collides (simulated): the metadata check rejects it.
    other = TextEmbeddingCache(tmp_path, "enc-a")
    other.key = lambda caption: cache.key("caption one")
    assert other.get("caption two") is None
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    assert cache.get("caption one") is None
    cache.put("caption one", torch.zeros(2, 4))
    assert torch.equal(cache.get("caption one"), torch.zeros(2, 4))


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    cache = TextEmbeddingCache(tmp_path, "enc")
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst) and os.path.basename(src).startswith(".tmp-")
        assert not os.path.exists(dst)  # the final name appears only through the rename
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", spy_replace)
    path = cache.put("hello", torch.randn(5, 8))
    assert replaced == [path]
    monkeypatch.setattr(cache_module.os, "replace", real_replace)

    # A writer that dies mid-write leaves neither a final file nor its temporary file.
    import safetensors.torch

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.put("world", torch.randn(5, 8))
    folder = os.path.dirname(cache.path("world"))
    assert not os.path.exists(cache.path("world"))
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    assert cache.get("world") is None and cache.get("hello").shape == (5, 8)


def test_t5_missing_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "t5-v1_1-xxl"
    with pytest.raises(MissingWeightsError, match="does not exist.*T5 v1.1 XXL.*never downloads"):
        T5TextEncoder(missing)
    missing.mkdir()
    with pytest.raises(ValueError, match="config.json"):  # MissingWeightsError is a ValueError too
        T5TextEncoder(missing)


def test_t5_missing_transformers_gives_an_install_hint(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "spiece.model").write_bytes(b"")
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"pip install 'osp\[text\]'"):
        T5TextEncoder(tmp_path)


def _tiny_t5(path):
    """A 1-layer T5 encoder and a word-level fast tokenizer (with T5's </s> appended), saved locally."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "panda", "eats", "bamboo", "cat"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32,
                                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(path)
    return path


def test_t5_wrapper_end_to_end_on_a_tiny_local_model(tmp_path):
    path = _tiny_t5(str(tmp_path / "t5"))
    enc = T5TextEncoder(path, max_length=12, dtype=torch.float32)
    states, mask = enc(["a red panda eats bamboo", "cat"])
    assert states.shape == (2, 12, 16) and states.dtype == torch.float32
    assert mask.sum(1).tolist() == [6, 2]  # words + </s>
    assert torch.all(states[mask == 0] == 0) and torch.isfinite(states).all()
    ids, _ = enc.tokenize("cat")
    assert ids[0, :2].tolist() == [8, 1] and ids[0, 2:].eq(0).all()
    assert json.loads(enc.identity)["max_length"] == 12 and enc.out_channels == 16
    cached = CachedTextEncoder(enc, tmp_path / "cache")
    s2, m2 = cached(["cat", "a red panda eats bamboo"])
    torch.testing.assert_close(s2, states.flip(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(m2, mask.flip(0))
    bf16 = T5TextEncoder(path, max_length=12)
    assert bf16.identity != enc.identity and bf16(["cat"])[0].dtype == torch.bfloat16


def test_tiny_encoder_feeds_latte():
    """The tiny encoder's output plugs straight into LatteT2V's caption inputs."""
    pytest.importorskip("diffusers")
    import osp
    from osp.models import LatteT2V

    enc = _tiny(out_channels=24, max_length=20)
    states, mask = enc(["a red panda", ""])
    torch.manual_seed(0)
    model = LatteT2V(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
                     cross_attention_dim=32, sample_size=8, caption_channels=24, video_length=5).eval()
    with osp.ops.use_backend("torch"), torch.no_grad():
        out = model(torch.randn(2, 4, 5, 8, 8), torch.tensor([1, 2]), states, encoder_attention_mask=mask).sample
    assert out.shape == (2, 8, 5, 8, 8) and torch.isfinite(out).all()


def test_tiny_encoder_raw_states_and_per_call_length():
    """raw=True keeps the network's states at the pads (pads attend to the caption only); max_length
    applies to one call; the caption's own states do not depend on the length."""
    enc = _tiny(max_length=48)
    zeroed, mask = enc(CAPTIONS[:2])
    raw, raw_mask = enc.encode(CAPTIONS[:2], raw=True)
    assert torch.equal(mask, raw_mask) and torch.equal(raw[mask == 1], zeroed[mask == 1])
    assert torch.all(raw[mask == 0].abs().sum(-1) > 0)
    short, short_mask = enc.encode(CAPTIONS[:2], max_length=30, raw=True)
    long, long_mask = enc.encode(CAPTIONS[:2], max_length=64, raw=True)  # longer than the built-in position table
    assert short.shape == (2, 30, 16) and long.shape == (2, 64, 16) and enc.max_length == 48
    torch.testing.assert_close(short, raw[:, :30], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long[:, :48], raw, rtol=1e-5, atol=1e-5)
    assert torch.equal(long_mask[:, :48], mask) and long_mask[:, 48:].eq(0).all()
    with pytest.raises(ValueError, match="max_length=0"):
        enc.encode(CAPTIONS, max_length=0)


def test_t5_raw_states_are_the_models_own(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = _tiny_t5(str(tmp_path / "t5"))
    enc = T5TextEncoder(path, max_length=12, dtype=torch.float32)
    raw, mask = enc.encode(["cat", ""], max_length=20, raw=True)
    assert raw.shape == (2, 20, 16) and mask.sum(1).tolist() == [2, 1]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    t5 = transformers.T5EncoderModel.from_pretrained(path).eval()
    ids = tok(["cat", ""], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        want = t5(ids.input_ids, attention_mask=ids.attention_mask)[0]
    torch.testing.assert_close(raw, want)
    assert raw[1, 1:].abs().sum() > 0  # the empty caption's pad states, which upstream feeds unmasked
    zeroed, _ = enc.encode(["cat", ""], max_length=20)
    assert torch.equal(zeroed[mask == 1], raw[mask == 1]) and zeroed[mask == 0].eq(0).all()
    assert enc.to("cpu") is enc and enc.device == torch.device("cpu")


def test_cache_passes_raw_and_other_lengths_to_the_encoder_uncached(tmp_path):
    inner = _tiny()
    cached = CachedTextEncoder(inner, tmp_path)
    raw, _ = cached.encode(CAPTIONS[:1], raw=True)
    torch.testing.assert_close(raw, inner.encode(CAPTIONS[:1], raw=True)[0])
    other, _ = cached.encode(CAPTIONS[:1], max_length=20)
    assert other.shape == (1, 20, 16)
    assert (cached.hits, cached.misses) == (0, 0) and not os.listdir(tmp_path)  # nothing cached
    assert cached.to("cpu") is cached
