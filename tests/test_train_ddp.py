"""osp train-t2v on 2 CPU processes: ``torchrun --standalone --nproc_per_node 2`` (DDP over gloo).

The ranks read disjoint shards (osp.data.ResumableSampler, not accelerate's re-sharding), one model
is saved, and a run resumed from a checkpoint under DDP ends with the uninterrupted run's weights.

FSDP is not tested here: accelerate (1.x) enables FSDP only for GPU-class devices; an FSDP launch
config with ``use_cpu`` runs plain DDP over gloo (osp train-t2v logs a warning when that happens).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from osp.train import checkpoint as ckpt
from test_train import data, max_abs_diff, subprocess_env  # noqa: F401  (data is a fixture)

pytest.importorskip("accelerate")
pytest.importorskip("av")


def torchrun(args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [exe] if os.path.isfile(exe) else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--standalone", "--nproc_per_node", "2", "-m", "osp", "train-t2v", *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def ddp_args(data, out, extra=()):  # noqa: F811
    return ["--model", "LatteT2V-tiny", "--cache_dir", data["cache"], "--output_dir", str(out),
            "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--mixed_precision", "no", "--dataloader_num_workers", "0", "--seed", "5", "--use_ema",
            "--cfg_dropout", "0.5", "--learning_rate", "1e-3", "--log_sample_indices", *extra]


def test_two_process_ddp_trains_saves_one_model_and_resumes_exactly(data, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    proc = torchrun(ddp_args(data, out))
    assert "MULTI_CPU on 2 process(es)" in proc.stdout
    assert proc.stdout.count("trained model:") == 1  # the main process saves
    assert {"model", "model_ema", "checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    state = ckpt.read_state(str(out / "checkpoint-4"))
    assert state["world_size"] == 2 and state["step"] == 4
    assert {"random_states_0.pkl", "random_states_1.pkl", "ema.pt"} <= set(os.listdir(out / "checkpoint-4"))
    with open(out / "train_log.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # 12 clips / (2 processes x batch 2) = 3 steps per epoch; the two ranks' shares are disjoint
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first_epoch = [i for r in records[:3] for i in r["indices"]]
    assert sorted(first_epoch) == list(range(12))
    assert len(records[3]["indices"]) == 4 and records[3]["epoch"] == 1

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    proc = torchrun(ddp_args(data, resumed, ["--resume_from_checkpoint", "latest"]))
    assert "resumed from" in proc.stdout
    assert max_abs_diff(str(resumed / "model"), str(out / "model")) <= 1e-6
    assert max_abs_diff(str(resumed / "model_ema"), str(out / "model_ema")) <= 1e-6
    with open(resumed / "train_log.jsonl", encoding="utf-8") as f:
        again = [json.loads(line) for line in f]
    assert [r["indices"] for r in again] == [r["indices"] for r in records[2:]]
