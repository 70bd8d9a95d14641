"""The latent cache (osp.train.latent_cache writes, osp.data.CachedLatentDataset reads): entries equal
the encoders' outputs, a second run is all hits, a different encoder or transform is refused, an
interrupted run resumes without redoing finished entries, bad clips are skipped, items are a function
of (seed, epoch, index), and ``osp cache-latents`` works end to end."""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("av", reason="PyAV is not installed (pip install av)")

from osp.cli import main
from osp.data import (
    CachedLatentDataset,
    CacheError,
    CacheMismatchError,
    VideoCaptionDataset,
    skipped_lines,
    transforms,
)
from osp.data.latents import clip_entry_path, read_entry, text_key
from osp.data.synthetic import make_dataset
from osp.models import CausalVideoVAE
from osp.models.text import TextEmbeddingCache, TinyTextEncoder
from osp.data.captions import preprocess_captions
from osp.train.latent_cache import cache_latents, vae_fingerprint

VAE_CONFIG = dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1)


def tiny_vae(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalVideoVAE.from_config(VAE_CONFIG).eval()


def tiny_text(max_length=24):
    return TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2, max_length=max_length)


class CountingVAE(torch.nn.Module):
    """A VAE wrapper that counts encode calls and can fail on the n-th one (an interrupted run)."""

    def __init__(self, vae, fail_at=None):
        super().__init__()
        self.vae, self.calls, self.fail_at = vae, 0, fail_at
        self.config = vae.config
        self.temporal_compression, self.spatial_compression = vae.temporal_compression, vae.spatial_compression

    def encode(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.vae.encode(x)

    def state_dict(self, *args, **kwargs):
        return self.vae.state_dict(*args, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    return make_dataset(str(root), num_videos=5, num_frames=24, size=(32, 40), seed=1, num_images=3)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def dataset(data, **kw):
    args = dict(num_frames=9, max_image_size=16, use_image_num=2)
    args.update(kw)
    return VideoCaptionDataset(data["data_path"], **args)


@pytest.fixture(scope="module")
def cache(data, vae, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "c")
    summary = cache_latents(dataset(data), vae, tiny_text(), path, windows=2, vae_source="tiny-vae",
                            text_encoder_source="tiny")
    return path, summary


def test_entries_are_the_encoders_outputs(data, vae, cache):
    path, summary = cache
    assert summary["written"] == 5 and summary["reused"] == 0 and summary["skipped"] == 0
    ds = dataset(data)
    mean, std, meta = read_entry(clip_entry_path(path, 3))
    begins, flips = json.loads(meta["begins"]), json.loads(meta["flips"])
    total = int(meta["frames"])
    assert total == 24 and begins == ds.window_begins(24, 2) == [3, 11] and flips == [0, 1]
    assert mean.shape == (4, 4, 3 + 2, 2, 2)  # (K x flips, C, F' + N, h, w)
    _, frames = ds.read_frames(3, begins)
    with torch.no_grad():
        for w, b in enumerate(begins):
            for f in (0, 1):
                video = transforms.video_transform(frames[w], 16, bool(f))
                dist = vae.encode(video[None]).latent_dist
                v = 2 * w + f
                torch.testing.assert_close(mean[v, :, :3], dist.mean[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(std[v, :, :3], dist.std[0], atol=1e-5, rtol=1e-5)
                for k, t in enumerate(transforms.image_frame_indices(9, 2)):  # images: 1-frame clips
                    image = vae.encode(video[None, :, t:t + 1]).latent_dist
                    torch.testing.assert_close(mean[v, :, 3 + k], image.mean[0, :, 0], atol=1e-5, rtol=1e-5)


def test_items_sample_the_stored_variants_with_text_states(data, cache):
    path, _ = cache
    ds = CachedLatentDataset(path, seed=4)
    assert len(ds) == 5 and ds.scaling_factor == pytest.approx(0.18215)
    item = ds[2]
    assert set(item) == {"latents_mean", "latents_std", "text_states", "text_mask", "index", "skipped"}
    assert item["latents_mean"].shape == item["latents_std"].shape == (4, 5, 2, 2)
    assert item["latents_mean"].dtype == torch.float32 and (item["latents_std"] > 0).all()
    assert item["text_states"].shape == (3, 24, 16) and item["text_mask"].dtype == torch.int64
    caption = preprocess_captions([json.load(open(data["data_path"]))[2]["cap"][0]])[0]
    states, mask = tiny_text()([caption])
    for row in range(3):  # the clip's caption for the video and for each of its frames
        assert torch.equal(item["text_states"][row], states[0]) and torch.equal(item["text_mask"][row], mask[0])
    mean, _, _ = read_entry(clip_entry_path(path, 2))
    variants = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        m = ds[2]["latents_mean"]
        v = [k for k in range(mean.shape[0]) if torch.equal(mean[k], m)]
        assert len(v) == 1
        variants.add(v[0])
    assert len(variants) >= 3  # draws cover windows and flips
    again = CachedLatentDataset(path, seed=4)
    again.set_epoch(7)
    assert torch.equal(again[2]["latents_mean"], ds[2]["latents_mean"])
    assert torch.equal(again[(7, 2)]["latents_mean"], ds[2]["latents_mean"])
    batch = next(iter(DataLoader(ds, batch_size=2)))  # default_collate
    assert batch["latents_mean"].shape == (2, 4, 5, 2, 2) and batch["text_states"].shape == (2, 3, 24, 16)
    assert ds.manifest["vae"]["path"] == "tiny-vae" and ds.manifest["text_encoder"]["name"] == "tiny"


def test_text_states_use_the_text_embedding_cache_format(cache):
    path, _ = cache
    enc = tiny_text()
    store = TextEmbeddingCache(os.path.join(path, "text"), enc.identity)
    caption = "a test caption"
    assert store.key(caption) == text_key(enc.identity, caption)


def test_second_run_is_all_hits(data, vae, cache):
    path, _ = cache
    counting = CountingVAE(vae)
    summary = cache_latents(dataset(data), counting, tiny_text(), path, windows=2)
    assert summary["reused"] == 5 and summary["written"] == 0 and summary["captions_encoded"] == 0
    assert counting.calls == 0


@pytest.mark.parametrize("change,field", [
    (dict(windows=3), "cache_windows"),
    (dict(dataset=dict(num_frames=5)), "num_frames"),
    (dict(dataset=dict(max_image_size=24)), "max_image_size"),
    (dict(dataset=dict(use_image_num=0)), "use_image_num"),
    (dict(vae_seed=1), "vae_fingerprint"),
    (dict(text=32), "text_encoder_identity"),
], ids=["windows", "frames", "size", "images", "vae-weights", "text-encoder"])
def test_a_different_identity_is_refused(data, cache, change, field):
    path, _ = cache
    ds = dataset(data, **change.get("dataset", {}))
    counting = CountingVAE(tiny_vae(change.get("vae_seed", 0)))
    with pytest.raises(CacheMismatchError, match=field):
        cache_latents(ds, counting, tiny_text(change.get("text", 24)), path, windows=change.get("windows", 2))
    assert counting.calls == 0
    CachedLatentDataset(path)  # the cache is left as it was


def test_reader_checks_the_expected_identity(cache, vae):
    path, _ = cache
    ok = dict(num_frames=9, max_image_size=16, sample_rate=1, use_image_num=2, use_img_from_vid=True,
              vae_fingerprint=vae_fingerprint(vae))
    CachedLatentDataset(path, expect_identity=ok)
    CachedLatentDataset(path, expect_identity=CachedLatentDataset(path).identity_hash)
    with pytest.raises(CacheMismatchError, match="num_frames: cache 9, expected 17"):
        CachedLatentDataset(path, expect_identity=dict(ok, num_frames=17))
    with pytest.raises(CacheMismatchError, match="image_source"):
        CachedLatentDataset(path, expect_identity=dict(ok, use_img_from_vid=False))
    with pytest.raises(CacheMismatchError):
        CachedLatentDataset(path, expect_identity="0" * 64)
    with pytest.raises(ValueError, match="unknown fields"):
        CachedLatentDataset(path, expect_identity={"frames": 9})


def test_an_interrupted_run_resumes_without_redoing_entries(data, vae, cache, tmp_path):
    path = str(tmp_path / "c")
    killed = CountingVAE(vae, fail_at=2 * 2 + 1)  # each clip: one call for the clip, one for its images
    with pytest.raises(KeyboardInterrupt):
        cache_latents(dataset(data), killed, tiny_text(), path, windows=2)
    with pytest.raises(CacheError, match="incomplete"):
        CachedLatentDataset(path)
    assert sorted(os.listdir(os.path.join(path, "clips"))) == ["00000000.safetensors", "00000001.safetensors"]
    open(os.path.join(path, "clips", ".tmp-left-by-a-kill.safetensors"), "wb").write(b"partial")
    resumed = CountingVAE(vae)
    summary = cache_latents(dataset(data), resumed, tiny_text(), path, windows=2)
    assert summary["reused"] == 2 and summary["written"] == 3 and resumed.calls == 3 * 2
    assert summary["captions_encoded"] == 0  # captions were cached before the VAE pass
    assert not [n for n in os.listdir(os.path.join(path, "clips")) if n.startswith(".tmp-")]
    reference, _ = cache
    for i in range(5):
        a, b = read_entry(clip_entry_path(path, i)), read_entry(clip_entry_path(reference, i))
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    ds = CachedLatentDataset(path)
    assert len(ds) == 5 and ds[4]["skipped"] == ""


def test_bad_clips_are_skipped_when_caching_and_reading(data, vae, tmp_path):
    root = os.path.dirname(data["data_path"])
    entries = json.load(open(data["data_path"]))[:3]
    entries.insert(1, {"path": "videos/missing.mp4", "cap": ["gone"]})
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps(entries))
    ds = VideoCaptionDataset(str(data_path), video_folder=root, num_frames=9, max_image_size=16)
    summary = cache_latents(ds, vae, tiny_text(), str(tmp_path / "c"), windows=1)
    assert summary["skipped"] == 1 and summary["written"] == 3
    cached = CachedLatentDataset(str(tmp_path / "c"))
    item = cached[1]
    expected = (f"videos/missing.mp4: file not found (looked in video_folder {root!r}, the working directory, "
                f"beside {str(data_path)!r})")
    assert item["index"] == 2 and skipped_lines(item["skipped"]) == [expected]
    os.remove(clip_entry_path(str(tmp_path / "c"), 3))  # a damaged cache: the clip is skipped, named
    item = cached[3]
    assert item["index"] == 0 and item["skipped"] == f"clip 3: cache entry {os.path.join('clips', '00000003.safetensors')} missing"
    log = [json.loads(line) for line in open(tmp_path / "c" / "cache_log.jsonl")]
    assert any(r.get("status") == "skipped" and r["path"] == "videos/missing.mp4" for r in log)


def test_images_from_an_image_json_are_drawn_at_read_time(data, vae, tmp_path):
    ds = dataset(data, use_img_from_vid=False, image_data_path=data["image_data_path"], use_image_num=2)
    summary = cache_latents(ds, vae, tiny_text(), str(tmp_path / "c"), windows=1)
    assert summary["images"] == 3 and summary["images_written"] == 3
    cached = CachedLatentDataset(str(tmp_path / "c"), expect_identity=dict(use_image_num=2, use_img_from_vid=False))
    images = [read_entry(os.path.join(tmp_path, "c", "images", f"{j:08d}.safetensors")) for j in range(3)]
    captions = preprocess_captions([e["cap"][0] for e in json.load(open(data["image_data_path"]))])
    enc = tiny_text()
    for i in range(3):
        item = cached[i]
        assert item["latents_mean"].shape == (4, 3 + 2, 2, 2)
        for k in range(2):
            latent = item["latents_mean"][:, 3 + k:4 + k]
            j = next(j for j in range(3) for v in range(2) if torch.equal(images[j][0][v], latent))
            assert torch.equal(item["text_states"][1 + k], enc([captions[j]])[0][0])


def test_cache_latents_command(data, tmp_path, capsys):
    ae = tmp_path / "vae"
    tiny_vae().save_pretrained(str(ae))
    args = ["cache-latents", "--data_path", data["data_path"], "--ae_path", str(ae), "--text_encoder_name", "tiny",
            "--caption_channels", "16", "--model_max_length", "20", "--cache_dir", str(tmp_path / "c"),
            "--num_frames", "9", "--max_image_size", "16", "--use_image_num", "1", "--cache_windows", "1",
            "--mixed_precision", "no", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 written" in out and str(tmp_path / "c") in out
    ds = CachedLatentDataset(str(tmp_path / "c"), expect_identity=dict(num_frames=9, model_max_length=20))
    assert ds[0]["text_states"].shape == (2, 20, 16)
    assert ds.manifest["vae"]["path"] == os.path.abspath(ae) and ds.manifest["text_encoder"]["name"] == "tiny"
    assert main(args) == 0 and "5 already there" in capsys.readouterr().out
    assert main([a if a != "9" else "5" for a in args]) == 2  # another transform into the same folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_frames" in err[0]


@pytest.mark.parametrize("case", ["missing-data", "bad-entry", "no-ae", "no-t5", "frames", "size", "windows"])
def test_cache_latents_mistakes_are_one_line_exit_2(data, tmp_path, capsys, case):
    ae = tmp_path / "vae"
    tiny_vae().save_pretrained(str(ae))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"path": "a.mp4", "cap": ["x"]}, {"path": 3, "cap": ["y"]}]')
    base = {"--data_path": data["data_path"], "--ae_path": str(ae), "--text_encoder_name": "tiny",
            "--cache_dir": str(tmp_path / "c"), "--num_frames": "9", "--max_image_size": "16",
            "--device": "cpu", "--caption_channels": "16"}
    change, match = {
        "missing-data": ({"--data_path": str(tmp_path / "none.json")}, "no such file"),
        "bad-entry": ({"--data_path": str(bad)}, "entry 1"),
        "no-ae": ({"--ae_path": str(tmp_path / "nothing")}, "--ae_path"),
        "no-t5": ({"--text_encoder_name": str(tmp_path / "t5")}, "--text_encoder_name"),
        "frames": ({"--num_frames": "8"}, "--num_frames 8"),
        "size": ({"--max_image_size": "20"}, "--max_image_size 20"),
        "windows": ({"--cache_windows": "0"}, "--cache_windows"),
    }[case]
    args = ["cache-latents"] + [x for k, v in {**base, **change}.items() for x in (k, v)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not os.path.exists(tmp_path / "c" / "manifest.json")
