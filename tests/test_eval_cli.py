"""``osp reconstruct`` and ``osp eval-vae`` (spec F.1, F.2): the frame rule, preprocessing, pairing by
name, reports of missing names, short videos and frame-count mismatches, the JSON and the table, and
user mistakes (exit code 2, one line)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av")

import osp.data.video as video_mod  # noqa: E402
from osp.cli import main  # noqa: E402
from osp.data import eval_video  # noqa: E402
from osp.data.video import VideoReader, write_mp4  # noqa: E402
from osp.eval import psnr, ssim  # noqa: E402

from vae_helpers import tiny_config  # noqa: E402


def frames(T, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, H // 4, W // 4, generator=g)  # smooth content survives the codec
    img = F.interpolate(base, size=(H, W), mode="bilinear", align_corners=False)[0]
    clip = torch.stack([img.roll(t, dims=-1) for t in range(T)])
    return (clip * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- the frame rule and preprocessing --------------------------------------------------------------------


def test_clip_indices_follow_upstream():
    assert eval_video.clip_indices(100, 17, 1) == list(range(17))
    assert eval_video.clip_indices(100, 5, 3) == [0, 3, 7, 10, 14]  # linspace(0, 14, 5) truncated
    # shorter: e = total, n = int(total / window * num_frames)
    assert eval_video.clip_indices(10, 17, 1) == list(range(10))
    assert eval_video.clip_indices(10, 5, 3) == [int(v) for v in np.linspace(0, 9, int(10 / 15 * 5))]
    assert eval_video.clip_indices(2, 5, 3) == []  # int(2 / 15 * 5) = 0
    # total == window: the full window for the metrics (>=), the short branch for rec (>): same frames
    assert eval_video.clip_indices(17, 17, 1) == eval_video.clip_indices(17, 17, 1, full_if_equal=False)


def test_eval_and_rec_transforms():
    clip = torch.from_numpy(frames(2, 30, 45, seed=1))
    x = eval_video.eval_transform(clip, 20, 17)
    ref = F.interpolate(clip.permute(0, 3, 1, 2).float() / 255, size=(20, 30), mode="bilinear", align_corners=False)
    top, left = round(3 / 2), round(13 / 2)  # Python's round: 2 and 6
    torch.testing.assert_close(x, ref[..., top:top + 17, left:left + 17], rtol=0, atol=0)
    y = eval_video.rec_transform(clip, 20, 17)
    ref = F.interpolate(clip.permute(0, 3, 1, 2).float() / 255 * 2 - 1, size=(20, 30), mode="bilinear",
                        align_corners=True, antialias=True)
    torch.testing.assert_close(y, ref[..., top:top + 17, left:left + 17].permute(1, 0, 2, 3), rtol=0, atol=0)
    assert eval_video.short_side_size(45, 30, 20) == (30, 20)
    with pytest.raises(ValueError, match=r"crop 25 of frames 20x30"):
        eval_video.center_crop(ref, 25)


# --- osp eval-vae: pairing by name --------------------------------------------------------------------------


@pytest.fixture
def pair_dirs(tmp_path):
    """real: a, b, c; generated: b, c (copies) and d. Pairing by sorted position would compare a-b, b-c
    and c-d; by name it compares b-b and c-c (identical files: PSNR 100, SSIM 1)."""
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir()
    gen.mkdir()
    for i, name in enumerate("abc"):
        write_mp4(str(real / f"{name}.mp4"), frames(6, 40, 48, seed=i), fps=8)
    for name in "bc":
        shutil.copy(real / f"{name}.mp4", gen / f"{name}.mp4")
    write_mp4(str(gen / "d.mp4"), frames(6, 40, 48, seed=9), fps=8)
    (gen / "notes.txt").write_text("not a video")
    return real, gen


def test_eval_vae_pairs_by_name_and_reports(pair_dirs, tmp_path, capsys):
    real, gen = pair_dirs
    out = tmp_path / "m.json"
    code = main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--num_frames", "4",
                 "--resolution", "32", "--crop_size", "32", "--metric", "psnr", "ssim", "--device", "cpu",
                 "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "only in --real_video_dir: a" in captured.err and "only in --generated_video_dir: d" in captured.err
    record = json.loads(out.read_text())
    assert record["pairs"] == 2 and record["only_real"] == ["a"] and record["only_generated"] == ["d"]
    assert sorted(record["videos"]) == ["b", "c"]
    assert record["results"]["psnr"] == {"mean": 100.0, "upstream": 100.0, "videos": 2}
    assert record["results"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-12)
    table = captured.out.splitlines()
    assert table[0].split() == ["metric", "mean", "upstream", "videos"]
    assert table[1].split() == ["psnr", "100.0000", "100.0000", "2"]
    assert f"results written to {out}" in captured.out


def test_eval_vae_values_short_videos_and_mismatch(tmp_path, capsys):
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir()
    gen.mkdir()
    for i, (name, T) in enumerate([("long", 9), ("short", 3), ("shorter_gen", 9)]):
        write_mp4(str(real / f"{name}.mp4"), frames(T, 32, 40, seed=i), fps=8)
        fake = frames(T if name != "shorter_gen" else 6, 32, 40, seed=i)
        fake = np.clip(fake.astype(np.int16) + 6 * (i + 1), 0, 255).astype(np.uint8)
        write_mp4(str(gen / f"{name}.mkv"), fake, fps=8)  # another container: pairing is by stem
    out = tmp_path / "m.json"
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--num_frames", "8",
                 "--resolution", "24", "--crop_size", "24", "--batch_size", "2", "--device", "cpu",
                 "--json", str(out), "--subset_size", "0"]) == 0
    err = capsys.readouterr().err
    record = json.loads(out.read_text())
    assert "short video: short (real): 3 frames in the file, 3 used (window 8)" in err
    assert {"name": "shorter_gen", "side": "generated", "frames_in_file": 6, "frames_used": 6} in record["short"]
    assert record["frame_mismatch"] == [{"name": "shorter_gen", "real_frames": 8, "generated_frames": 6,
                                         "compared": 6}]
    assert record["videos"]["long"]["frames"] == 8 and record["videos"]["short"]["frames"] == 3
    # each video's value is the metric of its own pair, loaded by upstream's rule
    for name, T in (("long", 8), ("short", 3), ("shorter_gen", 6)):
        clips = []
        for path in (real / f"{name}.mp4", gen / f"{name}.mkv"):
            with VideoReader(str(path)) as r:
                idx = eval_video.clip_indices(r.frames, 8, 1)
                clips.append(eval_video.eval_transform(torch.from_numpy(r.read(idx)), 24, 24)[:T])
        a, b = clips[0][None], clips[1][None]
        assert record["videos"][name]["psnr"] == pytest.approx(psnr(a, b).item(), rel=1e-12)
        assert record["videos"][name]["ssim"] == pytest.approx(ssim(a, b).item(), rel=1e-12)
    # aggregation: batches (long, short), (shorter_gen); "mean" weights every frame, "upstream" every
    # batch's per-frame mean
    v = {n: record["videos"][n]["psnr"] for n in record["videos"]}
    mean = (8 * v["long"] + 3 * v["short"] + 6 * v["shorter_gen"]) / 17
    upstream = (8 * v["long"] / 2 + 3 * v["short"] / 2 + 6 * v["shorter_gen"]) / (8 / 2 + 3 / 2 + 6)
    assert record["results"]["psnr"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert record["results"]["psnr"]["upstream"] == pytest.approx(upstream, rel=1e-12)
    assert math.isfinite(record["results"]["ssim"]["mean"])


def test_eval_vae_lpips_uses_the_given_weights(pair_dirs, tmp_path, capsys):
    from osp.eval import LPIPS, lpips

    real, gen = pair_dirs
    torch.manual_seed(3)
    weights = tmp_path / "lpips_random.pth"
    torch.save(LPIPS("alex", pretrained=False).state_dict(), weights)
    # generated b differs from real b: a brighter copy
    with VideoReader(str(real / "b.mp4")) as r:
        clip = r.read(list(range(r.frames)))
    write_mp4(str(gen / "b.mp4"), np.clip(clip.astype(np.int16) + 30, 0, 255).astype(np.uint8), fps=8)
    out = tmp_path / "m.json"
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--num_frames", "4",
                 "--resolution", "32", "--crop_size", "32", "--metric", "lpips", "--device", "cpu",
                 "--lpips_weights", str(weights), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    clips = []
    for path in (real / "b.mp4", gen / "b.mp4"):
        with VideoReader(str(path)) as r:
            clips.append(eval_video.eval_transform(torch.from_numpy(r.read(list(range(4)))), 32, 32)[None])
    model = LPIPS("alex", weights=str(weights))
    expected = lpips(*clips, model=model).item()
    assert record["videos"]["b"]["lpips"] == pytest.approx(expected, rel=1e-5)
    assert record["videos"]["b"]["lpips"] > 0 and record["videos"]["c"]["lpips"] == pytest.approx(0, abs=1e-7)
    capsys.readouterr()
    missing = tmp_path / "none.pth"
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--metric", "lpips",
                 "--device", "cpu", "--lpips_weights", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1].startswith("osp eval-vae: error:") and str(missing) in err[-1]


@pytest.mark.parametrize("flags, message", [
    (["--crop_size", "300"], "--crop_size 300 > --resolution 256"),
    (["--num_frames", "0"], "--num_frames 0: expected a positive int"),
    (["--metric", "fvd", "--i3d_path", "/nope/i3d_torchscript.pt"], "no file at '/nope/i3d_torchscript.pt'"),
], ids=["crop", "frames", "i3d"])
def test_eval_vae_bad_flags(pair_dirs, flags, message, capsys):
    real, gen = pair_dirs
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--device", "cpu",
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("osp eval-vae: error:") and message in err[-1]


def test_eval_vae_missing_folder_and_no_pairs(tmp_path, pair_dirs, capsys):
    real, _ = pair_dirs
    assert main(["eval-vae", "--real_video_dir", str(tmp_path / "nope"), "--generated_video_dir", str(real)]) == 2
    assert "--real_video_dir" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(empty), "--device", "cpu"]) == 2
    assert "no video name is in both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(real), "--metric", "mse"])
    assert exc.value.code == 2


# --- osp reconstruct ------------------------------------------------------------------------------------------


def ref_rec_input(clip_uint8, resolution, crop):
    """Spec F.1 preprocessing written out: (C, T, H, W) in [-1, 1], trimmed to 1 + 4k frames and
    multiples of 8."""
    x = torch.from_numpy(clip_uint8).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    h, w = x.shape[-2:]
    size = (int(math.floor(h / w * resolution)), resolution) if w < h else (resolution, int(math.floor(w / h * resolution)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True, antialias=True)
    h, w = x.shape[-2:]
    i, j = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    x = x[..., i:i + crop, j:j + crop]
    T = x.shape[1]
    return x[:, :T - (T - 1) % 4, :x.shape[2] // 8 * 8, :x.shape[3] // 8 * 8]


def test_reconstruct_then_eval(tmp_path, monkeypatch, capsys):
    from osp.models import CausalVideoVAE

    torch.manual_seed(0)
    ae = tmp_path / "vae"
    vae = CausalVideoVAE.from_config(tiny_config()).eval()
    vae.save_pretrained(str(ae))
    real, gen = tmp_path / "real", tmp_path / "rec"
    real.mkdir()
    clips = {"clip_a": frames(7, 20, 28, seed=1), "clip_b": frames(3, 28, 20, seed=2)}
    for name, clip in clips.items():
        write_mp4(str(real / f"{name}.mp4"), clip, fps=8)
    written = {}
    real_write = video_mod.write_mp4

    def recording(path, frames_, *args, **kwargs):
        written[path] = frames_.clone()
        return real_write(path, frames_, *args, **kwargs)

    monkeypatch.setattr(video_mod, "write_mp4", recording)
    code = main(["reconstruct", "--real_video_dir", str(real), "--rec_path", str(gen), "--ae_path", str(ae),
                 "--num_frames", "5", "--resolution", "16", "--crop_size", "16", "--no-enable_tiling",
                 "--output_origin", "--device", "cpu", "--dtype", "float32", "--seed", "0", "--sample_fps", "10",
                 "--sample_rate", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "short video: clip_b: 3 frames in the file, 3 read, 1 reconstructed" in captured.err
    record = json.loads((gen / "reconstruct.json").read_text())
    assert [v["frames"] for v in record["videos"]] == [5, 1]
    for i, name in enumerate(sorted(clips)):
        with VideoReader(str(real / f"{name}.mp4")) as r:
            decoded = r.read(eval_video.clip_indices(r.frames, 5, 1, full_if_equal=False))
        x = ref_rec_input(decoded, 16, 16)[None]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(i))
            rec = vae.decode(z).sample[0]
        expected = ((rec.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)
        assert torch.equal(written[str(gen / f"{name}.mp4")], expected)
        origin = ((x[0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)
        assert torch.equal(written[str(gen / "origin" / f"{name}.mp4")], origin)
    assert (gen / "clip_a.mp4").is_file() and (gen / "origin" / "clip_a.mp4").is_file()

    # eval-vae pairs the reconstructions with their sources by name (origin/ is skipped)
    out = tmp_path / "m.json"
    assert main(["eval-vae", "--real_video_dir", str(real), "--generated_video_dir", str(gen), "--num_frames", "5",
                 "--resolution", "16", "--crop_size", "16", "--device", "cpu", "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert sorted(ev["videos"]) == ["clip_a", "clip_b"] and ev["only_real"] == ev["only_generated"] == []
    assert ev["frame_mismatch"] == [{"name": "clip_b", "real_frames": 3, "generated_frames": 1, "compared": 1}]
    assert 0 < ev["results"]["psnr"]["mean"] < 100


@pytest.mark.parametrize("flags, message", [
    (["--crop_size", "600"], "--crop_size 600 > --resolution 512"),
    (["--tile_overlap_factor", "1.5"], "--tile_overlap_factor 1.5"),
    (["--sample_rate", "-1"], "--sample_rate -1: expected a positive int"),
], ids=["crop", "overlap", "rate"])
def test_reconstruct_bad_flags(tmp_path, flags, message, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "vae").mkdir()
    assert main(["reconstruct", "--real_video_dir", str(tmp_path / "real"), "--generated_video_dir",
                 str(tmp_path / "out"), "--ae_path", str(tmp_path / "vae"), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("osp reconstruct: error:") and message in err[0]


def test_reconstruct_missing_vae_and_empty_folder(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    assert main(["reconstruct", "--video_path", str(tmp_path / "real"), "--rec_path", str(tmp_path / "out"),
                 "--model_path", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "--ae_path" in capsys.readouterr().err
    (tmp_path / "vae").mkdir()
    assert main(["reconstruct", "--video_path", str(tmp_path / "real"), "--rec_path", str(tmp_path / "out"),
                 "--ae_path", str(tmp_path / "vae"), "--device", "cpu"]) == 2
    assert "holds no videos" in capsys.readouterr().err


def test_to_uint8_truncates_and_trim_keeps_the_first():
    from osp.cli.reconstruct import to_uint8, trim

    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 6, 1, 1).expand(3, 6, 1, 1)
    out = to_uint8(x)
    assert out.shape == (6, 1, 1, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 127, 254, 255, 255]  # 127.5 -> 127, 254.87 -> 254
    y = torch.arange(10 * 19 * 21, dtype=torch.float32).view(1, 10, 19, 21)
    assert torch.equal(trim(y, 4, 8), y[:, :9, :16, :16])
