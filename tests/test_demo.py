"""osp demo: the quick form end to end in a fresh process (what `make demo` shows, tiny), the output
folder rules, and the learned-prompt measurement on made-up latents."""
import json
import os
import subprocess
import sys

import pytest
import torch

from osp.cli import _demo_train as story
from osp.cli import main as osp_main

pytest.importorskip("accelerate")
pytest.importorskip("av")
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "osp", "demo", "--quick", "--output_dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_quick_demo_exits_0_and_tells_the_whole_story(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in ("# osp demo --quick", "Time budget:", f"Everything it writes goes to {out}", "## 1. osp info",
                 "## 2. Parity", "parity: all PASS", "## 3. VAE", "## 4. Tiled decoding", "## 5. Train",
                 "$ osp make-data", "$ osp train-vae", "held-out reconstruction of 8 clips: PSNR",
                 "$ osp cache-latents", "$ osp train-t2v", "--use_ema", "--cfg_dropout 0.1",
                 "$ osp sample", "random weights", "## 6. Did it learn the prompt?", "Judged attribute:",
                 "| all |", "verdict: ", "## Summary", "time per section:"):
        assert line in text, line
    assert "## 7. Quick benchmark" not in text  # --quick skips it
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## Summary"):
        assert text.count(section) == 1
    assert text.index("## 5.") < text.index("## 6.") < text.index("## Summary")


def test_quick_demo_writes_its_outputs_whole(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0
    mp4s = sorted(p for p in os.listdir(out / "samples") if p.endswith(".mp4"))
    assert len(mp4s) == story.QUICK.mp4_prompts + 1  # the prompts and their grid
    assert all(os.path.getsize(out / "samples" / p) > 0 for p in mp4s)
    for sub in ("model", "model_ema"):
        assert os.path.isfile(out / "train" / sub / "config.json")
    # the trained VAE, with the scaling factor train-vae measured, is the one the latents came from
    with open(out / "vae" / "model" / "config.json", encoding="utf-8") as f:
        scaling_factor = json.load(f)["scaling_factor"]
    with open(out / "cache" / "manifest.json", encoding="utf-8") as f:
        assert str(out / "vae" / "model") in f.read()
    with open(out / "learned_prompt.json", encoding="utf-8") as f:
        record = json.load(f)
    assert record["attribute"] in story.ATTRIBUTES and record["rows"][-1]["value"] == "all"
    assert record["rows"][-1]["prompts"] == len(record["prompts"]) > 0
    assert record["verdict"] in proc.stdout
    vae = record["vae"]
    assert vae["steps"] == story.QUICK.vae_steps and vae["scaling_factor"] == scaling_factor != 0.18215
    assert vae["after"]["clips"] == 8 and vae["after"]["psnr"] > vae["before"]["psnr"]
    with open(out / story.MARKER, encoding="utf-8") as f:
        marker = json.load(f)
    assert marker["complete"] is True and marker["exit_code"] == 0
    leftovers = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if ".tmp" in n]
    assert not leftovers


def test_output_dir_with_foreign_files_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert osp_main(["demo", "--quick", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no osp demo wrote" in err[0]
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_a_previous_demo_folder_is_replaced_but_other_files_kept(tmp_path):
    old = story.prepare_output_dir(str(tmp_path / "d"), story.QUICK)
    os.makedirs(os.path.join(old, "train", "model"))
    with open(os.path.join(old, "learned_prompt.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(old, "notes.txt"), "w") as f:
        f.write("mine")
    again = story.prepare_output_dir(old, story.QUICK)
    assert sorted(os.listdir(again)) == sorted(["notes.txt", story.MARKER])
    with open(os.path.join(again, story.MARKER), encoding="utf-8") as f:
        assert json.load(f)["complete"] is False


def test_learned_prompt_measurement():
    """Two well separated classes: held-out accuracy 1, samples scored by their nearest class mean with
    a margin of the right sign; the verdict follows the numbers."""
    g = torch.Generator().manual_seed(0)
    centers = {"dark": torch.full((4, 2, 2, 2), -1.0), "light": torch.full((4, 2, 2, 2), 1.0)}
    labels = ["dark", "light"] * 6
    z = torch.stack([centers[lab] + 0.1 * torch.randn(4, 2, 2, 2, generator=g) for lab in labels])
    assert story.held_out_accuracy(z, labels) == 1.0
    names, means = story.class_means(z, labels)
    assert names == ["dark", "light"]
    good = story.score(torch.stack([centers["dark"], centers["light"]]), ["dark", "light"], names, means)
    assert [s["nearest"] for s in good] == ["dark", "light"] and all(s["margin"] > 0.9 for s in good)
    bad = story.score(torch.stack([centers["light"]]), ["dark"], names, means)
    assert bad[0]["nearest"] == "light" and bad[0]["margin"] < 0
    assert story.verdict(1.0, 0.5, 0.5, 0.3) and not story.verdict(0.6, 0.5, 0.5, 0.3)
    assert not story.verdict(1.0, 0.5, 0.5, -0.1)
