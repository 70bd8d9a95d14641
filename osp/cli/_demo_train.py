"""The training story of ``osp demo``: synthetic clips -> latent cache -> a tiny LatteT2V trained from
scratch -> mp4 samples -> a measured check that the model learned the prompt.

Each step is an osp command run in this process (``osp make-data``, ``osp train-vae``,
``osp cache-latents``, ``osp train-t2v``, ``osp sample``), printed as the command line a user would
type; only the two models' random initializations are made here in Python, since no command makes
a random-weight model.

The VAE is trained first (a tiny CausalVideoVAE, from scratch, on the synthetic clips; nothing is
downloaded), its PSNR/SSIM on held-out clips printed before and after; the text-to-video model then
trains on its latents, so its samples decode to coloured shapes. Learning the prompt is judged in
latent space: for the caption attribute whose values the training latents separate best, prompts
naming each value are sampled (as latents, with the pipeline) by the trained model and by the same
model before training, and each sample is scored by the class-mean latent it lies nearest to (mean
over the training clips with that value).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._utils import write_json_atomic

MARKER = "osp-demo.json"  # in --output_dir: which demo wrote the folder, and whether it finished
# What the demo writes under --output_dir (all of it is replaced by the next demo run there).
OUTPUTS = ("data", "heldout", "vae_init", "vae", "cache", "untrained", "train", "samples", "learned_prompt.json",
           "logs", MARKER)
ATTRIBUTES = ("background", "color", "shape", "direction")  # caption attributes make-data records


@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one demo run."""

    name: str
    num_videos: int
    num_frames: int
    size: int
    train_steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    sample_method: str
    sampling_steps: int
    guidance_scale: float
    prompts_per_class: int  # prompts per attribute value in the check
    mp4_prompts: int  # videos osp sample writes
    vae_steps: int  # osp train-vae steps (batches of 4 clips of 9 frames)
    seed: int = 0
    model_max_length: int = 64  # byte tokens: the longest caption ("a magenta triangle moving right on a
    # gradient background") is 56; fewer would cut the background off


FULL = Plan("full", num_videos=192, num_frames=17, size=32, train_steps=1500, batch_size=16, learning_rate=1e-3,
            warmup_steps=50, sample_method="PNDM", sampling_steps=50, guidance_scale=4.0, prompts_per_class=8,
            mp4_prompts=6, vae_steps=400)
QUICK = Plan("quick", num_videos=48, num_frames=9, size=32, train_steps=300, batch_size=16, learning_rate=1e-3,
             warmup_steps=20, sample_method="PNDM", sampling_steps=20, guidance_scale=4.0, prompts_per_class=4,
             mp4_prompts=2, vae_steps=30)


# --- output folder ------------------------------------------------------------------------------------


class StoryError(RuntimeError):
    """A step of the training story did not finish (a command failed, or training was stopped)."""


class OutputDirError(ValueError):
    """--output_dir cannot be used (a file, or a folder holding files no demo wrote)."""


def prepare_output_dir(path: str, plan: Plan) -> str:
    """Create ``path`` (absolute returned); a folder a previous demo wrote (it holds MARKER) has that
    demo's outputs removed; any other non-empty folder is refused, so the demo never deletes files
    it did not write."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"--output_dir {path!r} is a file; expected a folder (created if missing)")
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise OutputDirError(f"--output_dir {path!r} holds files that no osp demo wrote; expected a new or empty "
                                 "folder, or one a previous demo wrote (its outputs are replaced)")
        for name in OUTPUTS:
            p = os.path.join(path, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(path, exist_ok=True)
    write_json_atomic(os.path.join(path, MARKER), {"complete": False, "plan": asdict(plan), "started": time.time()})
    return path


# --- running osp commands ---------------------------------------------------------------------------


class _Indent(io.TextIOBase):
    """A stdout that indents every line it passes on (the commands' own output under their line)."""

    def __init__(self, out, prefix: str = "    "):
        self.out, self.prefix, self.at_start = out, prefix, True

    def write(self, s: str) -> int:
        for part in s.splitlines(keepends=True):
            if self.at_start and part.strip():
                self.out.write(self.prefix)
            self.out.write(part)
            self.at_start = part.endswith("\n")
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def _shown(arg: str, root: str) -> str:
    """One argument as a shell word; paths under the output folder as $OUT/..., so lines stay short."""
    if arg == root or arg.startswith(root + os.sep):
        rest = arg[len(root):]
        return "$OUT" + (shlex.quote(rest) if rest else "")
    return shlex.quote(arg)


def osp_command(argv: Sequence[str], root: str, quiet: bool = False) -> None:
    """Print ``$ osp ARGV`` and run it in this process (its output indented, or with ``quiet`` into
    root/logs/<command>.log); RuntimeError when it fails."""
    from . import main as osp_main

    print("$ osp " + " ".join(_shown(a, root) for a in argv), flush=True)
    if quiet:
        os.makedirs(os.path.join(root, "logs"), exist_ok=True)
        log = os.path.join(root, "logs", f"{argv[0]}.log")
        with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
            rc = osp_main(list(argv))
    else:
        with contextlib.redirect_stdout(_Indent(sys.stdout)):
            rc = osp_main(list(argv))
    sys.stdout.flush()
    if rc != 0:
        raise StoryError(f"osp {argv[0]} exited with {rc} (its message is above)")


# --- models made in Python -------------------------------------------------------------------------------


VAE_CONFIG = dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1)  # 4x8x8, 4 channels
VAE_CLIP_FRAMES = 9  # train-vae's clips (the causal VAE encodes any 1 + 4k frames)


def make_vae_init(path: str, plan: Plan) -> None:
    """Save a tiny CausalVideoVAE (VAE_CONFIG) at its random initialization (seeded) for train-vae."""
    from ..models import CausalVideoVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        vae = CausalVideoVAE(**VAE_CONFIG)
    tmp = f"{path}.tmp-{os.getpid()}"
    vae.save_pretrained(tmp)
    os.replace(tmp, path)


def reconstruction_metrics(vae_path: str, data_path: str, plan: Plan, device: torch.device) -> Dict[str, float]:
    """PSNR (dB) and SSIM of the VAE at ``vae_path`` on the clips of ``data_path`` (posterior mode,
    decoded, clamped), as osp eval-vae computes them (osp.eval; videos in [0, 1])."""
    from ..data import VideoCaptionDataset
    from ..eval import psnr, ssim
    from ..models import CausalVideoVAE

    data = VideoCaptionDataset(data_path, num_frames=VAE_CLIP_FRAMES, max_image_size=plan.size, use_image_num=0,
                               flip=False)
    clips = torch.stack([data[i]["video"] for i in range(len(data))]).to(device)  # (B, C, T, H, W) in [-1, 1]
    vae = CausalVideoVAE.from_pretrained(vae_path).to(device).eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(c[None]).latent_dist.mode()).sample for c in clips])
    real = ((clips.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).cpu()
    fake = ((rec.float().clamp(-1, 1) + 1) / 2).transpose(1, 2).cpu()
    return {"psnr": psnr(real, fake).mean().item(), "ssim": ssim(real, fake).mean().item(), "clips": len(clips)}


def make_untrained(path: str, plan: Plan, latent_frames: int, latent_size: int) -> None:
    """LatteT2V-tiny at its random initialization (seeded), saved so that training starts from it and
    the check can sample the very weights training started from."""
    from ..models import LatteT2V

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        model = LatteT2V.from_preset("LatteT2V-tiny", video_length=latent_frames,
                                     sample_size=[latent_size, latent_size])
    tmp = f"{path}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    os.replace(tmp, path)


# --- the check -------------------------------------------------------------------------------------


def training_latents(cache_dir: str, data_path: str) -> Tuple[torch.Tensor, List[dict], List[str]]:
    """(latents (N, C, F, h, w) as the model sees them: posterior means x scaling factor, attributes
    per clip, caption per clip) of the cached clips (each item's first draw of window and flip)."""
    from ..data import CachedLatentDataset

    ds = CachedLatentDataset(cache_dir)
    with open(data_path, encoding="utf-8") as f:
        entries = json.load(f)
    zs, attrs, caps = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        e = entries[int(item["index"])]
        zs.append(item["latents_mean"] * ds.scaling_factor)
        attrs.append(e.get("attributes") or {})
        caps.append(e["cap"][0])
    return torch.stack(zs), attrs, caps


def class_means(z: torch.Tensor, labels: Sequence[str]) -> Tuple[List[str], torch.Tensor]:
    names = sorted(set(labels))
    return names, torch.stack([z[[lab == n for lab in labels]].mean(0) for n in names])


def held_out_accuracy(z: torch.Tensor, labels: Sequence[str]) -> float:
    """Leave-one-out nearest-class-mean accuracy on the training latents: how well this latent space
    separates the attribute at all (the ceiling of the check)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    flat = z.flatten(1).double()
    counts = torch.bincount(y, minlength=len(names)).double()
    sums = torch.zeros(len(names), flat.shape[1], dtype=torch.float64).index_add_(0, y, flat)
    means = sums / counts[:, None]
    d = torch.cdist(flat, means)  # (N, K)
    own = counts[y]
    loo = (sums[y] - flat) / (own - 1).clamp(min=1)[:, None]  # own class mean without the clip itself
    d[torch.arange(len(y)), y] = (flat - loo).norm(dim=1)
    d[own < 2, :] = float("inf")  # a class of one clip cannot be held out
    ok = (d.argmin(1) == y) & (own >= 2)
    return ok.double().mean().item()


def score(samples: torch.Tensor, truth: Sequence[str], names: List[str], means: torch.Tensor) -> List[dict]:
    """Per sample: the nearest class mean and the margin (d_nearest_other - d_own) / (d_nearest_other
    + d_own), in (-1, 1), positive when the sample lies nearer its own class."""
    d = torch.cdist(samples.flatten(1).double(), means.flatten(1).double())
    out = []
    for row, t in zip(d, truth):
        k = names.index(t)
        other = torch.cat([row[:k], row[k + 1:]]).min()
        out.append({"nearest": names[int(row.argmin())], "margin": ((other - row[k]) / (other + row[k])).item()})
    return out


def choose_prompts(attrs: List[dict], caps: List[str], attribute: str, per_class: int) -> Tuple[List[str], List[str]]:
    """``per_class`` distinct training captions for each value of ``attribute`` (the first in data
    order), as (prompts, their values)."""
    prompts, truth = [], []
    for value in sorted({a[attribute] for a in attrs}):
        seen: List[str] = []
        for a, c in zip(attrs, caps):
            if a[attribute] == value and c not in seen:
                seen.append(c)
            if len(seen) == per_class:
                break
        prompts += seen
        truth += [value] * len(seen)
    return prompts, truth


def sample_latents(transformer_path: str, vae_path: str, prompts: List[str], plan: Plan,
                   device: torch.device) -> torch.Tensor:
    """The pipeline's final latents (b, C, F, h, w) for ``prompts`` (text_mask "mask": a model trained
    with caption dropout gets its learned null caption as the unconditional branch)."""
    from ..pipelines import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained(vae_path=vae_path, transformer_path=transformer_path,
                                               text_encoder="tiny", scheduler=plan.sample_method,
                                               version=f"{plan.num_frames}x{plan.size}x{plan.size}", device=device)
    generator = torch.Generator("cpu").manual_seed(plan.seed)
    out = pipe(prompts, num_inference_steps=plan.sampling_steps, guidance_scale=plan.guidance_scale,
               generator=generator, output_type="latent", text_mask="mask", progress=False)
    return out.video.float().cpu()


def verdict(trained: float, untrained: float, chance: float, margin: float) -> bool:
    """Learned when the trained model's samples land nearest their prompt's class clearly more often
    (by 0.25) than the untrained model's and than chance, with a positive mean margin."""
    return trained >= untrained + 0.25 and trained >= chance + 0.25 and margin > 0


# --- the story ---------------------------------------------------------------------------------------------


def run_training_story(root: str, plan: Plan, device: torch.device) -> dict:
    """Print sections 5 (train) and 6 (the learned-prompt check); returns the check's record."""
    timings: Dict[str, float] = {}
    data_dir, vae_train_dir, cache_dir = (os.path.join(root, n) for n in ("data", "vae", "cache"))
    vae_dir = os.path.join(vae_train_dir, "model")  # what osp train-vae saves
    init_dir, train_dir, samples_dir = (os.path.join(root, n) for n in ("untrained", "train", "samples"))
    data_path = os.path.join(data_dir, "data.json")

    print(f"\n## 5. Train a tiny text-to-video model from scratch ({plan.name} plan, device {device})\n")
    t = time.perf_counter()
    print(f"5a. {plan.num_videos} synthetic clips ({plan.num_frames} frames of {plan.size}x{plan.size}): one coloured "
          "shape moving over a background, captioned with its colour, shape, direction and background")
    osp_command(["make-data", "--output_dir", data_dir, "--num_videos", str(plan.num_videos), "--num_frames",
                 str(plan.num_frames), "--size", str(plan.size), "--seed", str(plan.seed)], root)
    with open(data_path, encoding="utf-8") as f:
        first = json.load(f)[0]["cap"][0]
    print(f"    e.g. {first!r}")
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    heldout_dir, init_vae_dir = os.path.join(root, "heldout"), os.path.join(root, "vae_init")
    heldout_path = os.path.join(heldout_dir, "data.json")
    print(f"\n5b. Train the VAE: a tiny CausalVideoVAE (hidden 32, mult [1,1,2,2], 1 res block; 4x8x8 compression "
          f"to 4 channels) from its random initialization (saved to $OUT/vae_init), {plan.vae_steps} steps of 4 "
          f"clips of {VAE_CLIP_FRAMES} frames, upstream's loss without the perceptual and adversarial terms (they need "
          "downloaded weights and many more steps). Held-out clips from another seed judge it.")
    osp_command(["make-data", "--output_dir", heldout_dir, "--num_videos", "8", "--num_frames", str(VAE_CLIP_FRAMES),
                 "--size", str(plan.size), "--seed", str(plan.seed + 1)], root, quiet=True)
    make_vae_init(init_vae_dir, plan)
    osp_command(["train-vae", "--load_from_checkpoint", init_vae_dir, "--video_path", os.path.join(data_dir, "videos"),
                 "--video_num_frames", str(VAE_CLIP_FRAMES), "--resolution", str(plan.size), "--batch_size", "4",
                 "--precision", "32", "--max_steps", str(plan.vae_steps), "--save_steps", str(plan.vae_steps),
                 "--lr", "2e-3", "--time_lr", "2e-3", "--perceptual_weight", "0", "--disc_start", "1000000",
                 "--num_workers", "0", "--seed", str(plan.seed), "--scaling_clips", "16",
                 "--output_dir", vae_train_dir, "--device", str(device)], root, quiet=True)
    before = reconstruction_metrics(init_vae_dir, heldout_path, plan, device)
    after = reconstruction_metrics(vae_dir, heldout_path, plan, device)
    with open(os.path.join(vae_dir, "config.json"), encoding="utf-8") as f:
        scaling_factor = json.load(f)["scaling_factor"]
    print(f"    (its log: $OUT/logs/train-vae.log) held-out reconstruction of {after['clips']} clips: "
          f"PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, SSIM {before['ssim']:.3f} -> {after['ssim']:.3f} "
          f"(before -> after training); scaling_factor {scaling_factor:.4g} (1 / std of its latents, measured by "
          "train-vae) gives the diffusion model unit-variance latents")
    vae_record = {"steps": plan.vae_steps, "before": before, "after": after, "scaling_factor": scaling_factor}
    print("\n5c. Latent cache: VAE posteriors and tiny-text-encoder caption states, stored once")
    osp_command(["cache-latents", "--data_path", data_path, "--num_frames", str(plan.num_frames), "--max_image_size",
                 str(plan.size), "--use_image_num", "0", "--ae_path", vae_dir, "--text_encoder_name", "tiny",
                 "--caption_channels", "64", "--model_max_length", str(plan.model_max_length), "--cache_dir",
                 cache_dir, "--mixed_precision", "no", "--cache_windows", "1", "--device", str(device)], root)
    timings["vae+cache"] = time.perf_counter() - t

    t = time.perf_counter()
    latent_frames = (plan.num_frames - 1) // 4 + 1
    make_untrained(init_dir, plan, latent_frames, plan.size // 8)
    print(f"\n5d. Train LatteT2V-tiny (2 layers, 2 heads x 32; saved at its random init to $OUT/untrained) for "
          f"{plan.train_steps} steps of {plan.batch_size} clips, every op through osp.ops (each op's first usable "
          "backend, as section 1 lists), with an EMA and caption dropout to the learned null caption")
    osp_command(["train-t2v", "--model", init_dir, "--cache_dir", cache_dir, "--output_dir", train_dir,
                 "--train_batch_size", str(plan.batch_size), "--max_train_steps", str(plan.train_steps),
                 "--learning_rate", str(plan.learning_rate), "--lr_scheduler", "constant_with_warmup",
                 "--lr_warmup_steps", str(plan.warmup_steps), "--mixed_precision", "no", "--no-gradient_checkpointing",
                 "--dataloader_num_workers", "0", "--seed", str(plan.seed), "--use_ema", "--ema_decay", "0.999",
                 "--cfg_dropout", "0.1", "--checkpointing_steps", str(plan.train_steps)], root)
    losses = read_losses(os.path.join(train_dir, "train_log.jsonl"))
    if not os.path.isdir(os.path.join(train_dir, "model_ema")):
        raise StoryError(f"training stopped after {len(losses)} of {plan.train_steps} steps (interrupted?); its "
                         f"checkpoint is in {train_dir}, and the next demo run starts afresh")
    timings["train"] = time.perf_counter() - t
    if losses:
        print(f"    loss (mean of each tenth of the run): {loss_curve(losses)}; "
              f"{len(losses) / max(timings['train'], 1e-9):.0f} steps/s overall")

    t = time.perf_counter()
    z, attrs, caps = training_latents(cache_dir, data_path)
    ceilings = {a: held_out_accuracy(z, [x[a] for x in attrs]) for a in ATTRIBUTES if all(a in x for x in attrs)}
    if not ceilings:
        raise StoryError(f"{data_path} records no caption attributes ({', '.join(ATTRIBUTES)}) per clip; expected "
                         "the 'attributes' that osp make-data writes")
    chances = {a: 1 / len({x[a] for x in attrs}) for a in ceilings}
    # judge the attribute the latents separate best, relative to chance
    attribute = max(ceilings, key=lambda a: (ceilings[a] - chances[a]) / (1 - chances[a]))
    prompts, truth = choose_prompts(attrs, caps, attribute, plan.prompts_per_class)
    mp4_prompts = [prompts[i * len(prompts) // plan.mp4_prompts] for i in range(plan.mp4_prompts)]
    print(f"\n5e. Sample the EMA weights with the pipeline ({plan.sample_method}, {plan.sampling_steps} steps, "
          f"guidance {plan.guidance_scale:g}) and write mp4s")
    osp_command(["sample", "--transformer_path", os.path.join(train_dir, "model_ema"), "--text_prompt", *mp4_prompts,
                 "--save_img_path", samples_dir, "--sample_method", plan.sample_method, "--num_sampling_steps",
                 str(plan.sampling_steps), "--guidance_scale", f"{plan.guidance_scale:g}", "--text_mask", "mask",
                 "--seed", str(plan.seed), "--fps", "8", "--no-enable_tiling", "--device", str(device)],
                root, quiet=True)
    mp4s = sorted(n for n in os.listdir(samples_dir) if n.endswith(".mp4"))
    print(f"    {len(mp4s)} mp4s in {samples_dir} ({len(mp4_prompts)} prompts and their grid; the log is "
          f"$OUT/logs/sample.log), decoded by the trained VAE: blurry coloured shapes at its {after['psnr']:.0f} dB.")
    timings["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    record = check(root, plan, device, z, attrs, attribute, prompts, truth, ceilings, chances, init_dir,
                   os.path.join(train_dir, "model_ema"), vae_dir)
    timings["check"] = time.perf_counter() - t
    record.update(timings=timings, mp4s=[os.path.join(samples_dir, n) for n in mp4s], losses=loss_curve(losses),
                  vae=vae_record)
    write_json_atomic(os.path.join(root, "learned_prompt.json"), record)
    print("\n(the numbers above: $OUT/learned_prompt.json)")
    return record


def check(root: str, plan: Plan, device: torch.device, z: torch.Tensor, attrs: List[dict], attribute: str,
          prompts: List[str], truth: List[str], ceilings: Dict[str, float], chances: Dict[str, float],
          untrained_path: str, trained_path: str, vae_path: str) -> dict:
    """Section 6: sample ``prompts`` with the untrained and the trained model; score each sample by its
    nearest class-mean latent."""
    names, means = class_means(z, [a[attribute] for a in attrs])
    chance = chances[attribute]
    print("\n## 6. Did it learn the prompt? (judged in latent space, where the attributes are measured)\n")
    others = ", ".join(f"{a} {ceilings[a]:.2f} (chance {chances[a]:.2f})" for a in ceilings if a != attribute)
    print(f"Judged attribute: {attribute}, the one this VAE's latents separate best: a training clip's latent is "
          f"nearest its own {attribute}'s mean latent (the others' clips held out) for {ceilings[attribute]:.2f} of "
          f"clips, chance {chance:.2f}. The others do not separate enough to judge: {others}.")
    print(f"For each {attribute}, {plan.prompts_per_class} training captions naming it are sampled (same seed) by "
          f"the model before training ($OUT/untrained) and after (the EMA); a sample counts when the nearest of the "
          f"{len(names)} class-mean latents is its prompt's. Margin: (nearest other - own) / (nearest other + own) "
          "distance, > 0 when nearer its own.\n")
    results = {}
    for label, path in (("untrained", untrained_path), ("trained", trained_path)):
        results[label] = score(sample_latents(path, vae_path, prompts, plan, device), truth, names, means)
    print(f"| {attribute} | prompts | untrained: nearest own | margin | trained (EMA): nearest own | margin |")
    print("|---|---|---|---|---|---|")
    rows = []
    for value in names + ["all"]:
        idx = [i for i, t in enumerate(truth) if value in ("all", t)]
        row = {"value": value, "prompts": len(idx)}
        cells = []
        for label in ("untrained", "trained"):
            hits = sum(results[label][i]["nearest"] == truth[i] for i in idx)
            margin = sum(results[label][i]["margin"] for i in idx) / len(idx)
            row[label] = {"hits": hits, "accuracy": hits / len(idx), "margin": margin}
            cells.append(f"{hits}/{len(idx)} ({hits / len(idx):.2f}) | {_signed(margin)}")
        rows.append(row)
        print(f"| {value} | {len(idx)} | {cells[0]} | {cells[1]} |")
    total = rows[-1]
    tr, un = total["trained"], total["untrained"]
    learned = verdict(tr["accuracy"], un["accuracy"], chance, tr["margin"])
    if learned:
        line = (f"verdict: learned. {tr['hits']}/{total['prompts']} trained samples lie nearest their prompt's "
                f"{attribute} ({tr['accuracy']:.2f}, margin {_signed(tr['margin'])}) against "
                f"{un['hits']}/{total['prompts']} before training ({un['accuracy']:.2f}, margin "
                f"{_signed(un['margin'])}); chance {chance:.2f}.")
    else:
        line = (f"verdict: not shown. Trained {tr['accuracy']:.2f} (margin {_signed(tr['margin'])}) against untrained "
                f"{un['accuracy']:.2f} and chance {chance:.2f}: learning is claimed only at >= 0.25 above both with "
                "a positive margin" + (" (--quick trains too briefly to show it; run the full demo)"
                                       if plan.name == "quick" else "") + ".")
    print(f"\n{line}")
    return {"attribute": attribute, "classes": names, "chance": chance, "ceilings": ceilings, "prompts": prompts,
            "truth": truth, "rows": rows, "samples": results, "learned": learned, "verdict": line,
            "plan": asdict(plan)}


def _signed(x: float) -> str:
    """+0.12 / -0.12, and 0.00 (not -0.00) for what rounds to zero."""
    return "0.00" if abs(x) < 0.005 else f"{x:+.2f}"


def read_losses(path: str) -> List[float]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec.get("step"):
                out.append(float(rec["loss"]))
    return out


def loss_curve(losses: List[float], parts: int = 10) -> str:
    if not losses:
        return ""
    n = len(losses)
    chunks = [losses[i * n // parts:(i + 1) * n // parts] for i in range(parts)]
    return " -> ".join(f"{sum(c) / len(c):.3f}" for c in chunks if c)


def finish(root: str, plan: Plan, summary: dict) -> None:
    write_json_atomic(os.path.join(root, MARKER), {"complete": True, "plan": asdict(plan), **summary})


def plan_for(quick: bool, train_steps: Optional[int] = None) -> Plan:
    plan = QUICK if quick else FULL
    if train_steps is not None:
        from dataclasses import replace

        plan = replace(plan, train_steps=train_steps)
    return plan
