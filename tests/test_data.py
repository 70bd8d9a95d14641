"""osp.data: upstream's frame indices, crop/resize and flip against independent formulas (spec D),
PyAV decoding of exactly the window's frames, joint image-video items from both image sources, bad
files skipped in a fixed order and reported, bad JSON entries named, the resumable sampler, and
``osp make-data``."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("av", reason="PyAV is not installed (pip install av)")

from osp.cli import main
from osp.data import (
    NoValidSampleError,
    ResumableSampler,
    VideoCaptionDataset,
    VideoReader,
    collate,
    skipped_lines,
    transforms,
)
from osp.data.synthetic import COLORS, make_dataset, write_mp4

# --- helpers ---------------------------------------------------------------------------------------------

LEVELS = 16 + 28 * np.arange(8)  # grey levels far apart enough to survive H.264


def id_frames(T: int, H: int = 32, W: int = 32) -> np.ndarray:
    """Frame t: top half grey LEVELS[t // 8], bottom half LEVELS[t % 8] (readable after lossy coding,
    resizing to the same size and a horizontal flip)."""
    f = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        f[t, : H // 2] = LEVELS[t // 8]
        f[t, H // 2:] = LEVELS[t % 8]
    return f


def frame_ids(frames: np.ndarray) -> list:
    """Inverse of id_frames on uint8 (T, H, W, 3)."""
    H = frames.shape[1]
    top = frames[:, 2: H // 2 - 2].reshape(len(frames), -1).mean(1)
    bottom = frames[:, H // 2 + 2: -2].reshape(len(frames), -1).mean(1)
    near = lambda v: int(np.abs(LEVELS - v).argmin())
    return [near(a) * 8 + near(b) for a, b in zip(top, bottom)]


def video_ids(video: torch.Tensor) -> list:
    """frame ids of a dataset video (3, T, S, S) in [-1, 1]."""
    u8 = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return frame_ids(u8)


def write_json(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """8 clips of 24 frames at 32x48 (non-square), 5 images."""
    root = tmp_path_factory.mktemp("synth")
    return make_dataset(str(root), num_videos=8, num_frames=24, size=(32, 48), seed=3, num_images=5)


@pytest.fixture(scope="module")
def id_clip(tmp_path_factory):
    """A 64-frame clip with key frames every 8 frames whose frames carry their index."""
    root = tmp_path_factory.mktemp("ids")
    path = str(root / "ids.mp4")
    write_mp4(path, id_frames(64), fps=24, gop=8)
    return root, write_json(root / "ids.json", [{"path": "ids.mp4", "cap": ["ids"]}])


# --- temporal window and frame indices (spec D.2) ----------------------------------------------------------


def upstream_indices(total, begin, n, s):
    """Exact-rational form of int(linspace(begin, end - 1, n)), end = min(begin + n*s, total)."""
    end = min(begin + n * s, total)
    return [begin] if n == 1 else [begin + (k * (end - 1 - begin)) // (n - 1) for k in range(n)]


@pytest.mark.parametrize("n,s", [(17, 1), (65, 1), (17, 3), (9, 2), (1, 1)], ids=lambda v: str(v))
def test_frame_indices_follow_upstream(n, s):
    for total in (1, 5, 17, 18, 19, 40, 64, 65, 66, 200):
        last = transforms.last_begin(total, n * s)
        assert last == max(0, total - n * s - 1)
        for begin in sorted({0, last // 2, last}):
            assert transforms.frame_indices(total, begin, n, s) == upstream_indices(total, begin, n, s)
    with pytest.raises(ValueError, match="begin"):
        transforms.frame_indices(64, transforms.last_begin(64, n * s) + 1, n, s)


def test_spec_examples_of_frame_indices():
    assert transforms.last_begin(64, 17) == 46  # 17-frame stage: begin in [0, 46], frame 63 never used
    assert transforms.frame_indices(64, 46, 17) == list(range(46, 63))
    assert transforms.last_begin(64, 65) == 0  # 65-frame stage on 64-frame clips: frame 0 twice
    assert transforms.frame_indices(64, 0, 65) == [0, 0] + list(range(1, 64))
    assert transforms.image_frame_indices(17, 4) == [0, 5, 10, 16]
    assert transforms.image_frame_indices(65, 16) == [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 64]


def test_reader_seeks_and_returns_exactly_the_asked_frames(id_clip):
    root, _ = id_clip
    with VideoReader(str(root / "ids.mp4")) as r:
        assert r.frames == 64
        assert frame_ids(r.read(list(range(64)))) == list(range(64))
    for indices in ([37, 38, 39], [63], [9, 9, 0, 50], list(range(46, 63))):
        with VideoReader(str(root / "ids.mp4")) as r:
            assert frame_ids(r.read(indices)) == indices


def test_items_read_upstreams_window_including_the_65_frame_quirk(id_clip):
    _, data = id_clip
    ds = VideoCaptionDataset(data, num_frames=65, max_image_size=32, flip=False)
    assert video_ids(ds[0]["video"]) == [0, 0] + list(range(1, 64))
    ds = VideoCaptionDataset(data, num_frames=17, max_image_size=32, flip=False, sample_rate=2)
    begins = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        ids = video_ids(ds[0]["video"])
        begin = ids[0]
        assert 0 <= begin <= transforms.last_begin(64, 34) and ids == upstream_indices(64, begin, 17, 2)
        begins.add(begin)
    assert len(begins) > 4  # the window moves with the epoch


# --- spatial transform (spec D.3) ------------------------------------------------------------------------


def aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """F.interpolate(bilinear, align_corners=True, antialias=True) along one axis, written out: a
    triangle filter stretched by the scale (n_in - 1) / (n_out - 1) when downscaling, centred at
    scale * (i + 0.5), normalised."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    support, inv = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = scale * (i + 0.5)
        for j in range(max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)):
            M[i, j] = max(0.0, 1 - abs((j - c + 0.5) * inv))
        M[i] /= M[i].sum()
    return M


def reference_transform(frames: np.ndarray, S: int, flip: bool) -> np.ndarray:
    """Spec D.3 in numpy float64: /255, square crop (Python round), resize, flip, 2x - 1 -> (3, T, S, S)."""
    _, H, W, _ = frames.shape
    x = frames.astype(np.float64) / 255
    if H < W:
        j = round((W - H) / 2)
        x = x[:, :, j:j + H]
    else:
        i = round((H - W) / 2)
        x = x[:, i:i + W]
    n = x.shape[1]
    M = aa_weights(n, S)
    y = np.einsum("ih,thwc,jw->tijc", M, x, M)
    if flip:
        y = y[:, :, ::-1]
    return (2 * y - 1).transpose(3, 0, 1, 2)


@pytest.mark.parametrize("shape,S", [((2, 20, 33, 3), 16), ((2, 20, 33, 3), 20), ((2, 41, 24, 3), 48),
                                     ((1, 30, 30, 3), 17)], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_crop_resize_flip_against_the_spec(shape, S, flip):
    frames = np.random.default_rng(sum(shape) + S).integers(0, 256, shape, dtype=np.uint8)
    got = transforms.video_transform(torch.from_numpy(frames), S, flip)
    assert got.dtype == torch.float32 and got.shape == (3, shape[0], S, S)
    ref = reference_transform(frames, S, flip)
    assert np.abs(got.numpy() - ref).max() < 2e-6


def test_center_crop_offset_rounds_half_to_even():
    assert transforms.center_crop_box(20, 33) == (0, 6, 20, 20)  # (33 - 20) / 2 = 6.5 -> 6
    assert transforms.center_crop_box(20, 35) == (0, 8, 20, 20)  # 7.5 -> 8
    assert transforms.center_crop_box(41, 24) == (8, 0, 24, 24)  # 8.5 -> 8


# --- items, flip, determinism ------------------------------------------------------------------------------


def test_item_contract_and_default_collate(synth):
    ds = VideoCaptionDataset(synth["data_path"], num_frames=9, max_image_size=32, use_image_num=2)
    item = ds[3]
    assert set(item) == {"video", "images", "captions", "index", "skipped"}
    assert item["video"].shape == (3, 9, 32, 32) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() and item["video"].max() <= 1
    assert item["index"] == 3 and item["skipped"] == ""
    batch = next(iter(DataLoader(ds, batch_size=4)))  # torch's default_collate
    assert batch["video"].shape == (4, 3, 9, 32, 32) and batch["images"].shape == (4, 3, 2, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["skipped"] == [""] * 4
    assert len(batch["captions"]) == 3 and len(batch["captions"][0]) == 4  # default_collate transposes
    mine = collate([ds[i] for i in range(4)])
    assert [len(c) for c in mine["captions"]] == [3] * 4 and mine["skipped"] == [""] * 4
    assert torch.equal(mine["video"], batch["video"])


def test_flip_is_the_mirror_of_the_same_window_and_items_depend_on_seed_epoch_index(synth):
    kw = dict(num_frames=9, max_image_size=24, seed=5)
    flipping = VideoCaptionDataset(synth["data_path"], **kw)
    plain = VideoCaptionDataset(synth["data_path"], flip=False, **kw)
    seen = set()
    for epoch in range(3):
        flipping.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(flipping)):
            a, b = flipping[i]["video"], plain[i]["video"]
            flipped = torch.equal(a, b.flip(-1))
            assert flipped or torch.equal(a, b)
            seen.add(flipped)
    assert seen == {True, False}
    again = VideoCaptionDataset(synth["data_path"], **kw)
    again.set_epoch(2)
    assert torch.equal(again[5]["video"], flipping[5]["video"])
    assert torch.equal(again[(2, 5)]["video"], flipping[5]["video"])  # (epoch, index) keys
    other_seed = VideoCaptionDataset(synth["data_path"], **dict(kw, seed=6))
    other_seed.set_epoch(2)
    assert any(not torch.equal(other_seed[i]["video"], flipping[i]["video"]) for i in range(len(flipping)))


def test_workers_give_the_same_batches(synth):
    ds = VideoCaptionDataset(synth["data_path"], num_frames=5, max_image_size=16, seed=1)
    ds.set_epoch(4)
    one = list(DataLoader(ds, batch_size=3, num_workers=0, collate_fn=collate))
    two = list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate))
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(one, two))


# --- joint image-video items (spec D.4) ------------------------------------------------------------------


def test_images_from_the_clip_are_its_frames_with_its_caption(synth):
    ds = VideoCaptionDataset(synth["data_path"], num_frames=17, max_image_size=32, use_image_num=4)
    item = ds[2]
    assert torch.equal(item["images"], item["video"][:, [0, 5, 10, 16]])
    cap = json.load(open(synth["data_path"]))[2]["cap"][0]
    assert item["captions"] == [cap] * 5


def test_images_from_an_image_json(synth):
    entries = json.load(open(synth["image_data_path"]))
    ds = VideoCaptionDataset(synth["data_path"], num_frames=5, max_image_size=24, use_image_num=3,
                             use_img_from_vid=False, image_data_path=synth["image_data_path"])
    from PIL import Image

    root = os.path.dirname(synth["image_data_path"])
    pngs = [torch.from_numpy(np.asarray(Image.open(os.path.join(root, e["path"])).convert("RGB")).copy())[None]
            for e in entries]
    for i in range(4):
        item = ds[i]
        assert item["images"].shape == (3, 3, 24, 24) and len(item["captions"]) == 4
        assert item["captions"][0] == json.load(open(synth["data_path"]))[i]["cap"][0]
        used = []
        for k in range(3):
            img = item["images"][:, k:k + 1]
            match = [j for j, p in enumerate(pngs) for f in (False, True)
                     if torch.equal(transforms.video_transform(p, 24, f), img)]
            assert match, "each image is one of the JSON's images, flipped or not"
            assert item["captions"][1 + k] == entries[match[0]]["cap"][0]
            used.append(match[0])
        assert len(set(used)) == 3  # drawn without replacement
    with pytest.raises(ValueError, match="image_data_path"):
        VideoCaptionDataset(synth["data_path"], use_image_num=2, use_img_from_vid=False)
    with pytest.raises(ValueError, match="use_img_from_vid"):
        VideoCaptionDataset(synth["data_path"], use_image_num=2, image_data_path=synth["image_data_path"])


# --- bad files ---------------------------------------------------------------------------------------------


def _faststart_truncated(path, frames):
    """An mp4 whose header (at the front) promises every frame, cut in the middle of its data."""
    import av

    full = path + ".full"
    with av.open(full, "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = open(full, "rb").read()
    open(path, "wb").write(data[: len(data) * 9 // 10])


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    frames = id_frames(24)
    write_mp4(str(root / "good0.mp4"), frames)
    write_mp4(str(root / "good1.mp4"), frames[::-1].copy())
    full = open(root / "good0.mp4", "rb").read()
    (root / "cut.mp4").write_bytes(full[: len(full) // 2])  # header at the end: gone
    write_mp4(str(root / "empty.mp4"), frames[:0])
    write_mp4(str(root / "short.mp4"), frames[:3])
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _faststart_truncated(str(root / "late.mp4"), id_frames(64))
    names = ["good0", "missing", "cut", "empty", "short", "noise", "good1"]
    data = write_json(root / "data.json", [{"path": f"{n}.mp4", "cap": [n]} for n in names])
    return root, data, names


def test_bad_files_are_skipped_in_order_named_and_logged(bad_data, caplog):
    root, data, names = bad_data
    ds = VideoCaptionDataset(data, video_folder=str(root), num_frames=17, max_image_size=16)
    with caplog.at_level(logging.WARNING, logger="osp.data"):
        item = ds[1]
    assert item["index"] == 6 and item["captions"] == ["good1"]
    lines = skipped_lines(item["skipped"])
    assert [line.split(":")[0] for line in lines] == [f"{n}.mp4" for n in names[1:6]]
    reasons = dict(line.split(": ", 1) for line in lines)
    assert reasons["missing.mp4"].startswith("file not found")
    assert reasons["cut.mp4"].startswith("cannot open")
    assert reasons["empty.mp4"] in ("no video stream", "no frames")
    assert reasons["short.mp4"] == "too short: 3 frames, need at least 16"
    assert reasons["noise.mp4"].startswith("cannot open")
    assert all(f"{n}.mp4" in caplog.text for n in names[1:6])
    assert ds[0]["skipped"] == "" and ds[6]["index"] == 6
    batch = next(iter(DataLoader(ds, batch_size=7, collate_fn=collate)))
    assert batch["video"].shape[0] == 7  # batches keep their size
    assert batch["index"].tolist() == [0, 6, 6, 6, 6, 6, 6]
    assert ds.skip_count > 0


def test_a_truncated_file_fails_only_for_windows_past_the_cut(bad_data):
    root, _, _ = bad_data
    data = write_json(root / "late.json", [{"path": "late.mp4", "cap": ["late"]}, {"path": "good0.mp4", "cap": ["g"]}])
    ds = VideoCaptionDataset(data, video_folder=str(root), num_frames=9, max_image_size=16, flip=False)
    outcomes = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[0]
        if item["index"] == 0:
            assert video_ids(item["video"])[0] < 40
            outcomes.add("read")
        else:
            assert skipped_lines(item["skipped"])[0].startswith("late.mp4: truncated")
            outcomes.add("skipped")
    assert outcomes == {"read", "skipped"}


def test_no_valid_sample_is_a_clear_error(bad_data):
    root, _, _ = bad_data
    data = write_json(root / "allbad.json", [{"path": f"{n}.mp4", "cap": ["x"]} for n in ("missing", "noise")])
    ds = VideoCaptionDataset(data, video_folder=str(root), num_frames=5, max_image_size=16)
    with pytest.raises(NoValidSampleError, match="all 2 entries were skipped"):
        ds[0]


@pytest.mark.parametrize("content,match", [
    ('{"path": "a.mp4"}', "expected a list"),
    ("[]", "no entries"),
    ('[{"path": "a.mp4", "cap": ["x"]}, {"path": "b.mp4", "cap": []}]', "entry 1 .*cap"),
    ('[{"path": "a.mp4", "cap": ["x"]}, {"path": "b.mp4", "cap": ["y"]}, {"cap": ["z"]}]', "entry 2 .*path"),
    ('[{"path": "a.mp4", "cap": [3]}]', "entry 0 .*cap"),
    ('[["a.mp4", "x"]]', "entry 0 is a list"),
    ('[{"path": "a.mp4", "cap": ["x"]},', "not valid JSON"),
], ids=["object", "empty", "empty-cap", "no-path", "non-str-cap", "not-object", "broken"])
def test_bad_json_is_a_value_error_naming_the_entry(tmp_path, content, match):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        VideoCaptionDataset(str(path))


def test_missing_json_and_folder_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        VideoCaptionDataset(str(tmp_path / "none.json"))
    data = write_json(tmp_path / "d.json", [{"path": "a.mp4", "cap": "one caption"}])
    assert VideoCaptionDataset(data).entries[0].caps == ("one caption",)
    with pytest.raises(ValueError, match="video_folder"):
        VideoCaptionDataset(data, video_folder=str(tmp_path / "nope"))


# --- the sampler ---------------------------------------------------------------------------------------------


def test_sampler_permutation_sharding_and_start():
    s = ResumableSampler(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(10))
    s.set_epoch(0)
    assert list(s) == e0  # a function of (seed, epoch)
    assert list(ResumableSampler(10, seed=3, shuffle=False)) == list(range(10))

    ranks = [ResumableSampler(10, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(0)
    shares = [list(r) for r in ranks]
    assert all(len(r) == 3 and len(sh) == 3 for r, sh in zip(ranks, shares))
    assert sorted(sum(shares, [])) == sorted(e0[:9]) and shares[1] == e0[1:9:3]
    padded = [ResumableSampler(10, seed=3, num_replicas=4, rank=r, drop_last=False) for r in range(4)]
    assert [len(p) for p in padded] == [3] * 4
    assert sorted(sum((list(p) for p in padded), [])) == sorted(e0 + e0[:2])

    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=7)
    assert list(s) == full[7:] and len(s) == 10 and s.remaining == 3
    s.set_epoch(2, start=10)
    assert list(s) == []
    s.yield_epoch = True
    s.set_epoch(2, start=8)
    assert list(s) == [(2, i) for i in full[8:]]
    for kwargs, match in ((dict(rank=2, num_replicas=2), "rank"), (dict(num_samples=1, num_replicas=2), "num_samples"),
                          (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            ResumableSampler(**{"num_samples": 10, **kwargs})
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(0, start=11)


def test_resuming_mid_epoch_continues_the_same_batches(synth):
    ds = VideoCaptionDataset(synth["data_path"], num_frames=5, max_image_size=16, seed=2)
    sampler = ResumableSampler(len(ds), seed=2)

    def batches(epoch, start):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start=start)
        return list(DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True, collate_fn=collate))

    whole = batches(1, 0)
    resumed = batches(1, 2 * 2)  # two batches were finished before the stop
    assert len(resumed) == len(whole) - 2
    for a, b in zip(whole[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    seen = [i for b in whole[:2] + resumed for i in b["index"].tolist()]
    assert len(seen) == len(set(seen))  # no sample twice in the epoch


# --- osp make-data --------------------------------------------------------------------------------------------


def test_make_data_writes_a_dataset_the_dataset_reads(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["make-data", "--output_dir", str(out), "--num_videos", "6", "--num_frames", "9", "--size", "32",
                 "--seed", "4", "--num_images", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "data.json") in printed and str(out / "images.json") in printed
    entries = json.load(open(out / "data.json"))
    assert len(entries) == 6 and all(e["path"].endswith(".mp4") for e in entries)
    for e in entries:
        a = e["attributes"]
        assert e["cap"] == [f"a {a['color']} {a['shape']} moving {a['direction']} on a {a['background']} background"]
        with VideoReader(str(out / e["path"])) as r:
            frames = r.read(list(range(9)))
        assert r.frames == 9 and frames.shape == (9, 32, 32, 3)
        near = np.abs(frames.astype(int) - np.array(COLORS[a["color"]])).sum(-1) < 60
        assert near.sum() > 9 * 20  # the named colour is on screen
    # relative paths resolve under --video_folder, and next to the JSON without it
    for folder in (str(out), None):
        ds = VideoCaptionDataset(str(out / "data.json"), video_folder=folder, num_frames=9, max_image_size=16,
                                 use_image_num=2, use_img_from_vid=False, image_data_path=str(out / "images.json"))
        assert ds[0]["skipped"] == "" and ds[0]["images"].shape == (3, 2, 16, 16)
    # deterministic under --seed
    again = tmp_path / "again"
    assert main(["make-data", "--output_dir", str(again), "--num_videos", "6", "--num_frames", "9", "--size", "32",
                 "--seed", "4"]) == 0
    assert json.load(open(again / "data.json")) == entries
    for e in entries:
        assert (out / e["path"]).read_bytes() == (again / e["path"]).read_bytes()


@pytest.mark.parametrize("extra,match", [
    (["--size", "15"], "--size"), (["--size", "big"], "--size"), (["--num_videos", "0"], "--num_videos"),
    (["--num_frames", "0"], "--num_frames"), (["--fps", "0"], "--fps"), (["--seed", "-1"], "--seed"),
    (["--output_dir", "FILE"], "is a file"),
], ids=["odd-size", "word-size", "no-videos", "no-frames", "fps", "seed", "file"])
def test_make_data_mistakes_are_one_line_exit_2(tmp_path, capsys, extra, match):
    (tmp_path / "f").write_text("x")
    args = ["make-data", "--output_dir", str(tmp_path / "o")] + extra
    args = [str(tmp_path / "f") if a == "FILE" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_data_knows_no_model():
    """DESIGN's import rule: osp.data imports neither models, pipelines, diffusion nor train."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "osp" / "data"
    banned = ("models", "pipelines", "diffusion", "train", "cli")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if (node.level >= 2 and module.split(".")[0] in banned) or \
                        (node.level == 0 and module.startswith(tuple(f"osp.{b}" for b in banned))):
                    offenders.append(f"{path.name}: {module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith(
                    tuple(f"osp.{b}" for b in banned))]
    assert not offenders, offenders
