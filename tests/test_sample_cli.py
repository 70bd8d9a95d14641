"""``osp sample`` on tiny random models saved in upstream's folder layout (and osp's own folders):
mp4 files that PyAV decodes to the model's frames and size, images, upstream's file names, the JSON
records, and every user mistake as one line on stderr with exit code 2."""
import json
import os

import pytest
import torch

import osp
from osp.cli import main
from test_pipeline import tiny_transformer, tiny_vae
from test_text import _tiny_t5

VERSION = "9x32x32"


@pytest.fixture(autouse=True)
def torch_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: see test_pipeline.torch_backend
    try:
        with osp.ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    tiny_vae().save_pretrained(root / "model" / "vae")
    tiny_transformer().save_pretrained(root / "model" / VERSION)
    return {"model": str(root / "model"), "t5": _tiny_t5(str(root / "t5"))}


def sample(folders, out, *extra):
    return main(["sample", "--model_path", folders["model"], "--version", VERSION, "--text_encoder_name",
                 folders["t5"], "--save_img_path", str(out), "--num_sampling_steps", "4", "--device", "cpu", *extra])


def test_writes_mp4s_named_as_upstream_with_json_records(folders, tmp_path, capsys):
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    out = tmp_path / "out"
    assert sample(folders, out, "--text_prompt", "a red panda", "cat", "--seed", "3", "--fps", "8") == 0
    printed = capsys.readouterr().out
    names = ["a_red_pandaPNDM_gs7.5_s4.mp4", "catPNDM_gs7.5_s4.mp4", "PNDM_gs7.5_s4.mp4"]
    for name in names:
        assert f"saved {out / name}" in printed
    for name, (frames, h, w) in zip(names, [(9, 32, 32), (9, 32, 32), (9, 68, 34)]):  # grid: 2 rows, 1-px spacing
        with av.open(str(out / name)) as container:
            stream = container.streams.video[0]
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert stream.codec_context.name == "h264" and stream.average_rate == 8
        assert len(decoded) == frames and decoded[0].shape == (h, w, 3), name
    record = json.loads((out / "catPNDM_gs7.5_s4.json").read_text())
    assert record["prompt"] == "cat" and record["seed"] == 4 and record["file"] == names[1]
    assert record["scheduler"]["class"] == "PNDMScheduler" and record["scheduler"]["config"]["skip_prk_steps"] is False
    assert (record["num_sampling_steps"], record["guidance_scale"], record["dtype"]) == (4, 7.5, "float32")
    assert record["tiling"]["mode"] == "osp-v1.0" and record["tiling"]["overlap"] == 0.25
    assert record["models"]["transformer"].endswith(VERSION) and record["models"]["text_encoder"] == folders["t5"]
    assert record["osp_version"] == osp.__version__ and record["text_mask"] == "upstream"
    assert [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()] == ["a red panda",
                                                                                                         "cat"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_images_with_osp_folders_tiny_encoder_and_iddpm(folders, tmp_path, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red panda\n\n  cat  \n")
    out = tmp_path / "img"
    rc = main(["sample", "--ae_path", os.path.join(folders["model"], "vae"), "--transformer_path",
               os.path.join(folders["model"], VERSION), "--version", VERSION, "--text_encoder_name", "tiny",
               "--text_prompt", str(prompts), "--save_img_path", str(out), "--sample_method", "IDDPM",
               "--num_sampling_steps", "3", "--force_images", "--guidance_scale", "4", "--text_mask", "mask",
               "--tiling_mode", "stream", "--tiling_norm", "estimate", "--seed", "0"])
    assert rc == 0
    for name in ("a_red_pandaIDDPM_gs4.0_s3.jpg", "catIDDPM_gs4.0_s3.jpg"):
        assert Image.open(out / name).size == (32, 32)
    assert Image.open(out / "IDDPM_gs4.0_s3.jpg").size == (2 * 34 + 2, 34 + 2)  # make_grid: 2 per row, padding 2
    record = json.loads((out / "catIDDPM_gs4.0_s3.json").read_text())
    assert record["num_frames"] == 1 and record["fps"] is None and record["scheduler"]["name"] == "IDDPM"
    assert record["tiling"] == {"mode": "stream", "tile_sample_size": 256, "overlap": 0.25, "norm": "estimate"}


BAD = {
    "missing model folder": (["--model_path", "{tmp}/nowhere"], "nowhere"),
    "missing version folder": (["--version", "17x256x256"], "17x256x256"),
    "bad version": (["--version", "17x256"], "--version '17x256'"),
    "missing text encoder": (["--text_encoder_name", "DeepFloyd/t5-v1_1-xxl"], "'DeepFloyd/t5-v1_1-xxl' is not a folder"),
    "height not /8": (["--height", "20"], "--height 20: expected a positive multiple of 8"),
    "height not /16": (["--height", "24"], "--height 24; expected a positive multiple of 16"),
    "frames not 1+4k": (["--num_frames", "6"], "--num_frames 6: expected 1 + 4k"),
    "frames not the model's": (["--num_frames", "17"], "--num_frames 17; this model samples 1 (an image) or 9"),
    "too few PNDM steps": (["--num_sampling_steps", "2"], "--num_sampling_steps 2 with --sample_method PNDM: expected at least 4"),
    "norm with upstream tiling": (["--tiling_norm", "global"], "--tiling_norm global with --tiling_mode osp-v1.0"),
    "empty prompt file": (["--text_prompt", "{tmp}/empty.txt"], "holds no prompts"),
    "missing prompt file": (["--text_prompt", "{tmp}/none.txt"], "none.txt': no such file"),
    "another VAE name": (["--ae", "CausalVQVAEModel_4x4x4"], "--ae 'CausalVQVAEModel_4x4x4'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_user_mistakes_are_one_line_and_exit_2(folders, tmp_path, capsys, case):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args, expected = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--model_path", folders["model"], "--version", VERSION, "--text_encoder_name", folders["t5"],
            "--save_img_path", str(tmp_path / "out"), "--device", "cpu", "--num_sampling_steps", "4",
            "--text_prompt", "cat"]
    assert main(["sample", *base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("osp sample: error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_argparse_mistakes_exit_2(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--text_prompt", "cat", "--sample_method", "Nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Nope'" in err[0] and "PNDM" in err[0] and "IDDPM" in err[0]


def test_missing_pyav_is_one_line(folders, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    assert sample(folders, tmp_path / "out", "--text_prompt", "cat") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install av" in err[0]
