"""osp train-t2v (osp.train): exact resume after a clean stop (SIGTERM) and after kill -9, no sample
twice within an epoch, atomic checkpoints, EMA, caption dropout to the learned null caption, the raw
data path with joint images through the CLI, the training record osp sample reads, and bad inputs.

Everything runs a tiny LatteT2V (LatteT2V-tiny) on osp make-data clips of 5 frames at 32x32 with a
tiny random VAE and the tiny text encoder, on the torch backend, one thread.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import osp
from osp.cli import main as osp_main
from osp.train import checkpoint as ckpt
from osp.train.ema import EMA

pytest.importorskip("accelerate")
pytest.importorskip("av")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def torch_backend():
    """Tiny tensors: the torch backend on one thread (as test_pipeline does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with osp.ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env():
    env = dict(os.environ, OSP_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{"root", "data_json", "vae", "cache"}: 12 synthetic clips, a tiny VAE folder, and their latent
    cache (2 windows x flip, one image frame per clip, tiny text encoder at 64 channels)."""
    root = tmp_path_factory.mktemp("train_data")
    with osp.ops.use_backend("torch"):
        assert osp_main(["make-data", "--output_dir", str(root / "data"), "--num_videos", "12", "--num_frames", "5",
                         "--size", "32", "--seed", "0"]) == 0
        torch.manual_seed(0)
        from osp.models import CausalVideoVAE

        CausalVideoVAE(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1).save_pretrained(root / "vae")
        assert osp_main(["cache-latents", "--data_path", str(root / "data" / "data.json"), "--num_frames", "5",
                         "--max_image_size", "32", "--use_image_num", "1", "--ae_path", str(root / "vae"),
                         "--text_encoder_name", "tiny", "--caption_channels", "64", "--model_max_length", "32",
                         "--cache_dir", str(root / "cache"), "--mixed_precision", "no", "--cache_windows", "2",
                         "--device", "cpu"]) == 0
    return {"root": root, "data_json": str(root / "data" / "data.json"), "vae": str(root / "vae"),
            "cache": str(root / "cache")}


def train_args(data, out, steps=8, extra=()):
    """A run over the cache: 12 clips, batch 2 x accumulation 2 -> 3 optimizer steps per epoch;
    cosine schedule with warm-up, EMA, caption dropout, checkpoints every 2 steps."""
    return ["train-t2v", "--model", "LatteT2V-tiny", "--cache_dir", data["cache"], "--output_dir", str(out),
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "2", "--mixed_precision", "no", "--dataloader_num_workers", "0", "--seed", "3",
            "--use_ema", "--ema_decay", "0.9", "--cfg_dropout", "0.5", "--log_sample_indices", *extra]


def log_records(out):
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if '"indices"' in line]


def max_abs_diff(a_dir, b_dir):
    a, b = load_file(os.path.join(a_dir, WEIGHTS)), load_file(os.path.join(b_dir, WEIGHTS))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (8 steps, 2 epochs and a half) that every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with osp.ops.use_backend("torch"):
        torch.set_num_threads(1)
        assert osp_main(train_args(data, out, extra=["--checkpoints_total_limit", "2"])) == 0
    return str(out)


def assert_same_run(run, reference):
    assert max_abs_diff(os.path.join(run, "model"), os.path.join(reference, "model")) <= 1e-6
    assert max_abs_diff(os.path.join(run, "model_ema"), os.path.join(reference, "model_ema")) <= 1e-6
    got, want = log_records(run), log_records(reference)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["indices"] for r in got] == [r["indices"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)


def assert_no_sample_twice_per_epoch(records, samples_per_epoch=12):
    by_epoch = {}
    for r in records:
        by_epoch.setdefault(r["epoch"], []).extend(r["indices"])
    for epoch, seen in by_epoch.items():
        assert len(seen) == len(set(seen)), f"epoch {epoch} repeats samples: {seen}"
        assert len(seen) <= samples_per_epoch
    assert sorted(by_epoch[0]) == list(range(samples_per_epoch))


def test_reference_run_outputs(reference):
    names = sorted(os.listdir(reference))
    # --checkpoints_total_limit 2 keeps the last two; a run ends with a checkpoint of its last step
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint-6", "checkpoint-8"]
    assert {"model", "model_ema", "train_log.jsonl"} <= set(names)
    state = ckpt.read_state(os.path.join(reference, "checkpoint-8"))
    assert (state["step"], state["epoch"], state["batches_done"]) == (8, 2, 4)
    for sub in ("model", "model_ema"):
        with open(os.path.join(reference, sub, "osp_training.json"), encoding="utf-8") as f:
            rec = json.load(f)
        assert rec["text_encoder_name"] == "tiny" and os.path.isdir(rec["ae_path"])
        assert (rec["num_frames"], rec["height"], rec["width"], rec["use_image_num"]) == (5, 32, 32, 1)
    records = log_records(reference)
    assert all(len(r["indices"]) == 4 for r in records)  # batch 2 x accumulation 2
    assert all(r["grad_norm"] is not None and r["samples_per_s"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(1e-3)  # warm-up
    assert_no_sample_twice_per_epoch(records)


def test_exact_resume_after_a_clean_stop(data, reference, tmp_path, monkeypatch):
    """SIGTERM during step 3: the run finishes the step in flight, checkpoints step 4 and returns;
    --resume_from_checkpoint latest then ends with the reference's weights, EMA, data and losses."""
    from osp.train import t2v

    out = tmp_path / "run"
    write = t2v.JsonlLog.write

    def write_and_signal(self, record):
        write(self, record)
        if record.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(t2v.JsonlLog, "write", write_and_signal)
    assert osp_main(train_args(data, out)) == 0
    monkeypatch.setattr(t2v.JsonlLog, "write", write)
    assert not os.path.exists(out / "model")  # stopped, not finished
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert osp_main(train_args(data, out, extra=["--resume_from_checkpoint", "latest"])) == 0
    assert_same_run(str(out), reference)
    assert_no_sample_twice_per_epoch(log_records(str(out)))


def test_exact_resume_after_kill_9(data, reference, tmp_path):
    """A process killed by SIGKILL while writing checkpoint-6 leaves checkpoint-6.tmp, which "latest"
    skips; resuming from checkpoint-4 ends with the reference's weights and data order."""
    out = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "import osp.train.checkpoint as c\n"
        "finish = c.finish\n"
        "def dying(tmp, state):\n"
        "    if state['step'] == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return finish(tmp, state)\n"
        "c.finish = dying\n"
        "import torch; torch.set_num_threads(1)\n"
        "from osp.cli import main\n"
        f"sys.exit(main({train_args(data, out)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-6.tmp").is_dir() and (out / "checkpoint-6.tmp" / "model.safetensors").is_file()
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert osp_main(train_args(data, out, extra=["--resume_from_checkpoint", "latest"])) == 0
    assert not (out / "checkpoint-6.tmp").exists()
    assert_same_run(str(out), reference)
    assert_no_sample_twice_per_epoch(log_records(str(out)))


def test_latest_ignores_tmp_and_unfinished(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", False), ("checkpoint-9.tmp", True),
                           ("checkpoint-7", True), ("checkpoints", True), ("checkpoint-3.old", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / ckpt.STATE_NAME).write_text("{}")
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-7")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 7]
    assert ckpt.resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-7")
    assert ckpt.resolve_resume("latest", str(tmp_path / "empty")) is None  # a fresh start
    assert ckpt.resolve_resume("checkpoint-2", str(tmp_path)) == str(tmp_path / "checkpoint-2")  # upstream's basename
    with pytest.raises(ValueError, match="no training_state.json"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-10"), str(tmp_path))
    ckpt.remove_stale(str(tmp_path))
    assert not (tmp_path / "checkpoint-9.tmp").exists() and not (tmp_path / "checkpoint-3.old").exists()
    tmp = ckpt.begin(str(tmp_path), 7)  # a new save of an existing step replaces it only when finished
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-7")
    assert ckpt.finish(tmp, {"step": 7}) == str(tmp_path / "checkpoint-7")
    assert ckpt.read_state(str(tmp_path / "checkpoint-7")) == {"step": 7}


def initial_model(seed=3):
    from osp.models import LatteT2V
    from osp.train.rng import INIT, derive_seed

    torch.manual_seed(derive_seed(seed, INIT))
    return LatteT2V.from_preset("LatteT2V-tiny", video_length=2, sample_size=[4, 4])


def test_ema_moves_and_follows_its_schedule(reference):
    init = initial_model().state_dict()
    model = load_file(os.path.join(reference, "model", WEIGHTS))
    ema = load_file(os.path.join(reference, "model_ema", WEIGHTS))
    key = "transformer_blocks.0.attn1.to_q.weight"
    assert (ema[key] - init[key]).abs().max() > 1e-4  # stepped: upstream's EMA stays at the initial weights
    assert (ema[key] - model[key]).abs().max() > 1e-6  # an average, not a copy
    p = torch.nn.Parameter(torch.zeros(3))
    e = EMA([p], decay=0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    assert e.step() == 0.0 and torch.equal(e.shadow[0], torch.ones(3))  # first update copies
    with torch.no_grad():
        p.fill_(12.0)
    assert e.step() == pytest.approx(2 / 11)  # diffusers' (1 + n) / (10 + n) warm-up
    assert torch.allclose(e.shadow[0], torch.full((3,), 2 / 11 + 9 / 11 * 12.0))
    with e.applied():
        assert torch.allclose(p.detach(), e.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 12.0))


def test_cfg_dropout_replaces_captions_by_the_trained_null_caption(reference):
    from osp.models import LatteT2V

    init = initial_model()
    trained = LatteT2V.from_pretrained(os.path.join(reference, "model"))
    assert trained.config.learned_null_caption and trained.caption_projection.learned
    key = "caption_projection.y_embedding"
    assert (trained.state_dict()[key] - init.state_dict()[key]).abs().max() > 1e-4  # trained
    # the same state-dict keys as an upstream model: checkpoints stay interchangeable
    assert set(trained.state_dict()) == set(init.state_dict())
    assert not init.caption_projection.learned and init.config.learned_null_caption is False

    torch.manual_seed(0)
    b, L = 3, 300
    x, t = torch.randn(b, 4, 2, 4, 4), torch.tensor([10, 500, 999])
    states = torch.randn(b, L, 64)
    mask = torch.zeros(b, L, dtype=torch.long)
    mask[:, :7] = 1
    drop = torch.tensor([True, False, True])
    out = trained(x, t, states, encoder_attention_mask=mask, drop_caption=drop).sample
    null, null_mask = trained.null_caption(L)
    assert null_mask[:120].all() and not null_mask[120:].any() and null[120:].abs().max() == 0
    want = trained(x, t, torch.where(drop[:, None, None], null[None], states),
                   encoder_attention_mask=torch.where(drop[:, None], null_mask[None], mask)).sample
    assert torch.allclose(out, want, atol=1e-6)
    kept = trained(x, t, states, encoder_attention_mask=mask).sample
    assert torch.equal(out[1], kept[1]) and not torch.allclose(out[0], kept[0])
    trained.train()
    trained(x, t, states, encoder_attention_mask=mask, drop_caption=drop).sample.square().mean().backward()
    assert trained.caption_projection.y_embedding.grad.abs().sum() > 0


def test_pipeline_mask_mode_uses_the_learned_null_caption(reference):
    from osp.models import LatteT2V, TinyTextEncoder
    from osp.pipelines import TextToVideoPipeline

    class VaeStub:
        spatial_compression, temporal_compression = 8, 4

    trained = LatteT2V.from_pretrained(os.path.join(reference, "model"))
    pipe = TextToVideoPipeline(VaeStub(), trained, TinyTextEncoder(out_channels=64), "DDIM")
    states, mask = pipe.encode_prompt(["a red circle"], "", 2, True, "mask", clean_caption=False)
    null, null_mask = trained.null_caption(300)
    assert torch.equal(states[0], null.detach()) and torch.equal(states[1], null.detach())
    assert torch.equal(mask[0], null_mask)
    states, _ = pipe.encode_prompt(["a red circle"], "ugly", 1, True, "mask", clean_caption=False)
    assert not torch.equal(states[0], null.detach())  # a negative prompt is encoded as given
    states, _ = pipe.encode_prompt(["a red circle"], "", 1, True, "upstream", clean_caption=False)
    assert states.shape[1] != 300 or not torch.equal(states[0], null.detach())  # upstream mode unchanged


def test_raw_clips_with_joint_images_then_osp_sample(data, tmp_path, capsys):
    """The raw path (PyAV clips, VAE posterior samples, images as 1-frame clips, tiny T5 stand-in),
    then osp sample with nothing but --transformer_path: the training record names the VAE, the
    encoder and the size."""
    out = tmp_path / "raw"
    assert osp_main(["train-t2v", "--model", "LatteT2V-tiny", "--data_path", data["data_json"], "--ae_path",
                     data["vae"], "--text_encoder_name", "tiny", "--model_max_length", "32", "--num_frames", "5",
                     "--max_image_size", "32", "--use_image_num", "1", "--train_batch_size", "2",
                     "--max_train_steps", "2", "--checkpointing_steps", "5", "--mixed_precision", "bf16",
                     "--dataloader_num_workers", "1", "--output_dir", str(out), "--seed", "0", "--use_ema",
                     "--validation_prompts", "a red circle", "--validation_num_sampling_steps", "3"]) == 0
    assert sorted(os.listdir(out / "samples")) == ["step-2"]
    assert (out / "samples" / "step-2" / "00-a_red_circle.mp4").is_file()
    with open(out / "model_ema" / "osp_training.json", encoding="utf-8") as f:
        rec = json.load(f)
    assert (rec["ae_path"], rec["text_encoder_name"], rec["mixed_precision"]) == (data["vae"], "tiny", "bf16")
    capsys.readouterr()
    assert osp_main(["sample", "--transformer_path", str(out / "model_ema"), "--text_prompt", "a red circle",
                     "--num_sampling_steps", "3", "--sample_method", "DDIM", "--save_img_path", str(tmp_path / "s"),
                     "--seed", "0", "--text_mask", "mask"]) == 0
    with open(tmp_path / "s" / "a_red_circleDDIM_gs7.5_s3.json", encoding="utf-8") as f:
        sample = json.load(f)
    assert (sample["height"], sample["width"], sample["num_frames"]) == (32, 32, 5)
    assert sample["models"]["vae"] == data["vae"]


@pytest.mark.parametrize("extra, message", [
    (["--model", "LatteT2V-huge"], "--model 'LatteT2V-huge': expected a preset"),
    (["--num_frames", "16"], "--num_frames 16: expected 1 + 4k"),
    (["--max_image_size", "40"], "--max_image_size 40: expected a multiple of 16"),
    (["--cfg_dropout", "1.5"], "--cfg_dropout 1.5: expected a probability"),
    (["--train_batch_size", "0"], "--train_batch_size 0: expected a positive integer"),
    (["--lr_scheduler", "exponential"], "invalid choice"),
    (["--resume_from_checkpoint", "nowhere/checkpoint-5"], "--resume_from_checkpoint 'nowhere/checkpoint-5' does not"),
    (["--text_encoder_name", "no/such/t5"], "--text_encoder_name 'no/such/t5' is not a folder"),
    (["--ae_path", "no/such/vae"], "--ae_path 'no/such/vae'"),
    (["--data_path", "no/such.json"], "--data_path 'no/such.json' is not a file"),
    (["--cache_dir", "no/such/cache"], "--cache_dir 'no/such/cache' is not a folder"),
    (["--ae", "OtherVAE"], "--ae 'OtherVAE': expected CausalVAEModel_4x8x8"),
    (["--model", "LatteT2V-XL/122", "--cache_dir", "CACHE"], "caption_channels=4096"),
    (["--cache_dir", "DATA"], "--cache_dir"),
])
def test_cli_mistakes_are_one_line_and_exit_2(data, tmp_path, capsys, extra, message):
    extra = [data["cache"] if e == "CACHE" else str(data["root"] / "data") if e == "DATA" else e for e in extra]
    base = {"--model": "LatteT2V-tiny", "--data_path": data["data_json"], "--ae_path": data["vae"],
            "--text_encoder_name": "tiny", "--output_dir": str(tmp_path / "out"), "--mixed_precision": "no"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    if "--cache_dir" in base:
        base.pop("--data_path")
    argv = ["train-t2v"] + [x for kv in base.items() for x in kv]
    try:
        code = osp_main(argv)
    except SystemExit as exc:  # argparse's own errors (osp.cli.Parser: one line, exit 2)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_model_folder_and_upstream_pretrained_file(tmp_path):
    """--model: a folder with only config.json starts from random init, one with weights loads them;
    --pretrained: upstream's torch file with the weights under "model", loaded non-strictly."""
    from osp.models import LatteT2V
    from osp.train.t2v import TrainConfig, build_model

    source = initial_model(seed=1)
    source.save_pretrained(tmp_path / "with_weights")
    source.save_config(tmp_path / "config_only")
    sd = {k: v + 1.0 for k, v in source.state_dict().items() if not k.startswith("proj_out")}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "t2v.pt")
    notes = []
    loaded = build_model(TrainConfig(model=str(tmp_path / "with_weights")), 3, (8, 8), notes.append)
    assert loaded.config.video_length == 3 and list(loaded.config.sample_size) == [8, 8]
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    fresh = build_model(TrainConfig(model=str(tmp_path / "config_only")), 2, (4, 4), notes.append)
    assert not torch.equal(fresh.proj_out.weight, source.proj_out.weight)
    assert any("random init" in n for n in notes)
    pre = build_model(TrainConfig(model="LatteT2V-tiny", pretrained=str(tmp_path / "t2v.pt")), 2, (4, 4),
                      notes.append)
    key = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(pre.state_dict()[key], sd[key])
    assert "2 missing keys" in notes[-1] and "proj_out" in notes[-1]
    assert isinstance(pre, LatteT2V)
