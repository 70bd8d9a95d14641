"""TextToVideoPipeline: Open-Sora-Plan v1.0's VideoGenPipeline (spec B.3-B.6) over osp's models.

Components follow diffusers' names: ``vae`` (CausalVideoVAE), ``transformer`` (LatteT2V),
``text_encoder`` (an osp TextEncoder: T5TextEncoder, TinyTextEncoder, CachedTextEncoder) and
``scheduler`` (a diffusers scheduler, or osp's IDDPMSampler).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import BaseOutput

from ..data.captions import preprocess_captions
from .schedulers import IDDPMSampler, make_scheduler, scheduler_name

OUTPUT_TYPES = ("uint8", "latent", "latents", "pt", "np")
TEXT_MASKS = ("upstream", "mask")
UPSTREAM_MAX_LENGTH = 300  # upstream's encode_prompt hard-codes 300 caption tokens (spec B.4)


@dataclass
class TextToVideoPipelineOutput(BaseOutput):
    """``video``: by output_type, "uint8" (b, t, h, w, 3) uint8 on CPU; "pt" float (b, t, 3, h, w) in
    [0, 1] on the pipeline's device; "np" float32 numpy (b, t, h, w, 3) in [0, 1]; "latent" the final
    latents (b, C, F, h/8, w/8) as the transformer samples them (not divided by the VAE's scaling
    factor)."""

    video: Any


def parse_version(version: str) -> Tuple[int, int, int]:
    """(frames, height, width) of an upstream version string such as "17x256x256"."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", str(version))
    if not m:
        raise ValueError(f"version={version!r}; expected FRAMESxHEIGHTxWIDTH such as '17x256x256', '65x256x256' "
                         "or '65x512x512'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def load_text_encoder(text_encoder, *, caption_channels: int, torch_dtype: Optional[torch.dtype] = None,
                      device=None):
    """An osp caption encoder from "tiny" (the built-in offline TinyTextEncoder with the
    transformer's caption width), a local T5 directory (T5TextEncoder), or an encoder object (returned
    as it is)."""
    from ..models.text import T5TextEncoder, TinyTextEncoder

    if isinstance(text_encoder, (str, os.PathLike)):
        if os.fspath(text_encoder) == "tiny":
            enc = TinyTextEncoder(out_channels=caption_channels)
            return enc.to(device=device or "cpu", dtype=torch_dtype or torch.float32)
        return T5TextEncoder(text_encoder, dtype=torch_dtype or torch.float32, device=device or "cpu")
    if text_encoder is None or not callable(getattr(text_encoder, "encode", None)):
        raise ValueError(f"text_encoder={text_encoder!r:.80}; expected 'tiny', the directory of a local T5 encoder, "
                         "or an osp text encoder object (T5TextEncoder, TinyTextEncoder, CachedTextEncoder)")
    return text_encoder


def _module_device(module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class TextToVideoPipeline:
    r"""Text-to-video (and text-to-image) sampling with LatteT2V, as upstream's VideoGenPipeline.

    Args:
        vae: CausalVideoVAE (decodes latents / ``config.scaling_factor``; ``vae.enable_tiling(...)``
            is honoured).
        transformer: LatteT2V; the pipeline runs on its device, and the latents take its dtype.
        text_encoder: an osp caption encoder (``encode(captions, max_length=, raw=)``).
        scheduler: a diffusers scheduler, an ``IDDPMSampler``, or a ``--sample_method`` name
            (``osp.pipelines.SAMPLE_METHODS``).
        offload_text_encoder: move the text encoder to the CPU after each encoding (and back to the
            transformer's device before the next), so it does not sit beside the denoiser.
        default_size: (height, width) when a call gives none; default: the transformer's
            ``sample_size`` times the VAE's spatial compression. ``from_pretrained`` takes it from
            ``version`` as upstream does.
        max_sequence_length: caption tokens (upstream: 300).

    Use ``TextToVideoPipeline.from_pretrained(model_path, version=..., text_encoder=...)`` for the
    released folders.
    """

    def __init__(self, vae, transformer, text_encoder, scheduler="PNDM", *, offload_text_encoder: bool = False,
                 default_size: Optional[Tuple[int, int]] = None, max_sequence_length: int = UPSTREAM_MAX_LENGTH):
        self.vae, self.transformer = vae, transformer
        self.text_encoder = load_text_encoder(text_encoder, caption_channels=transformer.config.caption_channels)
        self.scheduler = make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        if offload_text_encoder and not callable(getattr(self.text_encoder, "to", None)):
            raise ValueError(f"offload_text_encoder=True but {type(self.text_encoder).__name__} has no .to(device) "
                             "to move it with; expected an encoder that can move (osp's encoders can)")
        self.offload_text_encoder = bool(offload_text_encoder)
        s = vae.spatial_compression
        if default_size is None:
            ss = transformer.config.sample_size
            ss = (ss, ss) if isinstance(ss, int) else tuple(ss)
            default_size = (ss[0] * s, ss[1] * s)
        self.default_size = (int(default_size[0]), int(default_size[1]))
        if not (isinstance(max_sequence_length, int) and max_sequence_length > 0):
            raise ValueError(f"max_sequence_length={max_sequence_length!r}; expected a positive int")
        self.max_sequence_length = max_sequence_length
        self.sources: Dict[str, Optional[str]] = {}
        if self.offload_text_encoder:
            self.text_encoder.to("cpu")

    # --- loading and placement -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_path: Optional[Union[str, os.PathLike]] = None, version: str = "17x256x256", *,
                        text_encoder=None, scheduler="PNDM", torch_dtype: Optional[torch.dtype] = None,
                        offload_text_encoder: bool = False, device=None,
                        vae_path: Optional[Union[str, os.PathLike]] = None,
                        transformer_path: Optional[Union[str, os.PathLike]] = None) -> "TextToVideoPipeline":
        """Load upstream's released layout: ``model_path/vae`` and ``model_path/<version>``.

        Args:
            model_path: the folder holding ``vae/`` and the version folders (upstream's
                Open-Sora-Plan-v1.0.0 download), or a hub repo id.
            version: "17x256x256", "65x256x256" or "65x512x512": the transformer's subfolder, and
                the default height and width (its second and third fields) as upstream derives them;
                the frame count comes from the transformer's ``video_length``.
            text_encoder: "tiny", the directory of a local T5 v1.1 XXL, or an osp encoder object.
            scheduler: a ``--sample_method`` name (default "PNDM", upstream's) or a scheduler object.
            torch_dtype: dtype of every component loaded here, the text encoder included (default
                float32; upstream samples in float16).
            offload_text_encoder: see the class.
            device: where the components go (default CPU).
            vae_path, transformer_path: model folders that replace ``model_path/vae`` and
                ``model_path/<version>`` (models trained by osp, which have no upstream layout).
        """
        from ..models import CausalVideoVAE, LatteT2V

        _, height, width = parse_version(version)
        if model_path is None and (vae_path is None or transformer_path is None):
            raise ValueError("model_path=None; expected upstream's model folder (with vae/ and the version folders), "
                             "or both vae_path and transformer_path")
        kw = dict(torch_dtype=torch_dtype, device=device)
        vae = (CausalVideoVAE.from_pretrained(vae_path, **kw) if vae_path is not None
               else CausalVideoVAE.from_pretrained(model_path, subfolder="vae", **kw))
        transformer = (LatteT2V.from_pretrained(transformer_path, **kw) if transformer_path is not None
                       else LatteT2V.from_pretrained(model_path, subfolder=version, **kw))
        enc = load_text_encoder(text_encoder, caption_channels=transformer.config.caption_channels,
                                torch_dtype=torch_dtype, device=device)
        pipe = cls(vae, transformer, enc, scheduler, offload_text_encoder=offload_text_encoder,
                   default_size=(height, width))
        pipe.sources = {
            "vae": os.fspath(vae_path) if vae_path is not None else os.path.join(os.fspath(model_path), "vae"),
            "transformer": (os.fspath(transformer_path) if transformer_path is not None
                            else os.path.join(os.fspath(model_path), version)),
            "text_encoder": os.fspath(text_encoder) if isinstance(text_encoder, (str, os.PathLike))
            else type(enc).__name__,
            "version": version,
        }
        return pipe

    @property
    def components(self) -> Dict[str, Any]:
        return {"vae": self.vae, "transformer": self.transformer, "text_encoder": self.text_encoder,
                "scheduler": self.scheduler}

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device."""
        return _module_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.transformer.parameters())).dtype

    def to(self, device) -> "TextToVideoPipeline":
        """Move the VAE, the transformer and (unless it is offloaded) the text encoder; returns self."""
        self.vae.to(device)
        self.transformer.to(device)
        if not self.offload_text_encoder and callable(getattr(self.text_encoder, "to", None)):
            self.text_encoder.to(device)
        return self

    # --- sizes ------------------------------------------------------------------------------------------

    def accepted_frames(self) -> Tuple[int, int]:
        """(1, the model's frames): one image, or the clip that ``video_length`` latent frames decode to."""
        return 1, 1 + (self.transformer.config.video_length - 1) * self.vae.temporal_compression

    def resolve_size(self, num_frames: Optional[int] = None, height: Optional[int] = None,
                     width: Optional[int] = None) -> Tuple[int, int, int]:
        """(frames, height, width) of a call, defaults filled in; ValueError naming a bad value and the
        accepted ones."""
        tc, s, p = self.vae.temporal_compression, self.vae.spatial_compression, self.transformer.patch_size
        image, video = self.accepted_frames()
        frames = video if num_frames is None else num_frames
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        accepted = f"{image} (an image) or {video} (this model's video_length {self.transformer.config.video_length} " \
                   f"latent frames)"
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % tc:
            raise ValueError(f"num_frames={frames!r}; expected 1 + {tc}k frames, and for this model {accepted}")
        if frames not in (image, video):
            raise ValueError(f"num_frames={frames}; this model samples {accepted}; expected one of ({image}, {video})")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % (s * p):
                raise ValueError(f"{name}={v!r}; expected a positive multiple of {s * p} (the VAE's {s}x spatial "
                                 f"compression times the transformer's patch size {p})")
        return frames, height, width

    # --- prompts ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _text_encoder_on(self, device: torch.device):
        if not self.offload_text_encoder:
            yield
            return
        self.text_encoder.to(device)
        try:
            yield
        finally:
            self.text_encoder.to("cpu")

    def encode_prompt(self, prompts: List[str], negative_prompt: str, num_videos_per_prompt: int, cfg: bool,
                      text_mask: str, clean_caption: bool = True
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(states for the transformer, caption mask or None): [negative, positive] along the batch
        when ``cfg``. ``text_mask="upstream"`` is upstream's encode_prompt with mask_feature (spec B.4);
        "mask" gives every branch its caption mask."""
        device, n, B = self.device, num_videos_per_prompt, len(prompts)
        L = self.max_sequence_length
        enc = self.text_encoder
        pos_caps = preprocess_captions(prompts, clean_caption)
        with self._text_encoder_on(device):
            if text_mask == "upstream":
                pos, mask = enc.encode(pos_caps, max_length=L, raw=True)
                pos, mask = pos.to(device), mask.to(device)
                # Upstream repeats states per prompt (p0, p0, p1, p1) but tiles the mask (m0, m1, m0, m1); the
                # two orders differ only for several prompts with several videos each, where upstream pairs
                # prompts with other prompts' masks. Reproduced, as this mode promises upstream's numbers.
                pos = pos.repeat(1, n, 1).view(B * n, pos.shape[1], -1)
                mask = mask.view(B, -1).repeat(n, 1)
                neg = None
                if cfg:
                    neg_caps = preprocess_captions([negative_prompt] * B, clean_caption)
                    neg, _ = enc.encode(neg_caps, max_length=pos.shape[1], raw=True)
                    neg = neg.to(device)
                    neg = neg.repeat(1, n, 1).view(B * n, neg.shape[1], -1)
                if B * n == 1:  # truncate both branches to the caption's k tokens; the negative keeps its pads
                    k = int(mask.sum().item())
                    pos = pos[:, :k]
                    neg = neg[:, :k] if neg is not None else None
                else:  # zero the positive's pad rows (they still reach cross-attention); the negative is whole
                    pos = pos * mask[:, :, None]
                states = torch.cat([neg, pos]) if cfg else pos
                return states, None
            pos, pmask = enc.encode(pos_caps, max_length=L)
            pos, pmask = pos.to(device).repeat_interleave(n, 0), pmask.to(device).repeat_interleave(n, 0)
            if not cfg:
                return pos, pmask
            if negative_prompt == "" and getattr(self.transformer.config, "learned_null_caption", False):
                # A model trained with caption dropout learned y_embedding as its unconditional caption:
                # guidance samples what was trained (the null caption and its mask, at L tokens).
                with torch.no_grad():
                    neg, nmask = self.transformer.null_caption(pos.shape[1])
                neg, nmask = neg.detach()[None], nmask[None]
            else:
                neg, nmask = enc.encode(preprocess_captions([negative_prompt], clean_caption), max_length=L)
            neg = neg.to(device=device, dtype=pos.dtype).expand(B * n, -1, -1)
            nmask = nmask.to(device).expand(B * n, -1)
            return torch.cat([neg, pos]), torch.cat([nmask, pmask])

    # --- sampling ---------------------------------------------------------------------------------------

    def prepare_latents(self, shape: Tuple[int, ...], generator, latents: Optional[torch.Tensor]) -> torch.Tensor:
        """Upstream's prepare_latents: randn (from ``generator``) in the pipeline's dtype, or the given
        latents moved to the device, times the scheduler's init_noise_sigma."""
        from diffusers.utils.torch_utils import randn_tensor

        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} videos; expected one per video "
                             "(prompts x num_videos_per_prompt)")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        else:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents of shape {got}; expected {tuple(shape)}")
            latents = latents.to(self.device)
        return latents * self.scheduler.init_noise_sigma

    def _denoise(self, latents, states, enc_mask, temporal, num_inference_steps, guidance_scale, cfg, generator,
                 eta, progress):
        from tqdm.auto import tqdm

        sched, tr = self.scheduler, self.transformer
        C = tr.config.in_channels
        learned_sigma = (tr.config.out_channels or C) // 2 == C

        def predict(x, t):
            out = tr(x, t, states, encoder_attention_mask=enc_mask, enable_temporal_attentions=temporal,
                     return_dict=False)[0]
            return out

        if isinstance(sched, IDDPMSampler):
            if isinstance(generator, list):
                raise ValueError("a list of generators with the IDDPM sampler; expected one torch.Generator (or None)")
            diffusion = sched.make_diffusion(num_inference_steps, learn_sigma=learned_sigma)

            def model(x, t):
                if not cfg:
                    return predict(x, t)
                out = predict(torch.cat([x, x]), torch.cat([t, t]))
                uncond, cond = out.chunk(2)
                eps = uncond[:, :C] + guidance_scale * (cond[:, :C] - uncond[:, :C])
                return torch.cat([eps, cond[:, C:]], dim=1)  # the variance half of the conditional branch

            bar = tqdm(total=diffusion.num_timesteps, disable=not progress, desc="denoising")
            x = latents
            for out in diffusion.p_sample_loop_progressive(model, tuple(latents.shape), noise=latents,
                                                           clip_denoised=False, generator=generator,
                                                           device=latents.device):
                x = out["sample"]
                bar.update()
            bar.close()
            return x

        try:
            sched.set_timesteps(num_inference_steps, device=self.device)
        except ValueError as exc:  # e.g. PNDM's warm-up needs >= 4 steps, DDIM/DDPM take <= 1000
            raise ValueError(f"num_inference_steps={num_inference_steps} is not accepted by {type(sched).__name__}: "
                             f"{exc}") from exc
        params = set(inspect.signature(sched.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        timesteps = sched.timesteps
        for t in tqdm(timesteps, disable=not progress, desc="denoising"):
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x, t)
            if not torch.is_tensor(t):
                tt = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=x.device)
            else:
                tt = t.reshape(1).to(x.device)
            out = predict(x, tt.expand(x.shape[0]))
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)  # on every channel, as upstream
            if learned_sigma:
                out = out.chunk(2, dim=1)[0]
            latents = sched.step(out, t, latents, **extra, return_dict=False)[0]
        return latents

    @contextlib.contextmanager
    def _quiet_tiling(self, progress: bool):
        cfg = getattr(self.vae, "_tiling", None)
        if progress or cfg is None or cfg.progress is False:
            yield
            return
        self.vae._tiling = dataclasses.replace(cfg, progress=False)
        try:
            yield
        finally:
            self.vae._tiling = cfg

    def decode_latents(self, latents: torch.Tensor, output_type: str = "uint8", progress: bool = True):
        """Decode (b, C, F, h, w) latents one video at a time (upstream decodes the batch at once; the
        VAE works per sample) and format them as ``output_type`` (see TextToVideoPipelineOutput).

        "uint8" is upstream's decode_latents: (x / 2 + 0.5).clamp(0, 1) * 255, **truncated** to
        uint8, computed in float16 when the VAE is float16 (upstream's case) and in float32 otherwise.
        """
        sf = self.vae.config.scaling_factor
        parts = []
        with self._quiet_tiling(progress):
            for i in range(latents.shape[0]):
                dec = self.vae.decode(latents[i:i + 1] / sf).sample  # (1, 3, T, H, W)
                if output_type == "uint8":
                    x = dec.to(torch.float16 if dec.dtype == torch.float16 else torch.float32)
                    parts.append(((x / 2.0 + 0.5).clamp(0, 1) * 255).to(torch.uint8).cpu().permute(0, 2, 3, 4, 1))
                else:
                    parts.append((dec.float() / 2.0 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
                del dec
        video = torch.cat(parts).contiguous()
        if output_type == "np":
            return video.permute(0, 1, 3, 4, 2).cpu().numpy()
        return video

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: str = "", num_frames: Optional[int] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, num_videos_per_prompt: int = 1,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "uint8", text_mask: str = "upstream",
                 progress: bool = True, eta: float = 0.0, clean_caption: bool = True) -> TextToVideoPipelineOutput:
        """Sample videos (or images, ``num_frames=1``) for one prompt or a list of prompts.

        Args:
            prompt: a str or a list of str (a batch; upstream's script calls once per prompt).
            negative_prompt: the unconditional branch's caption ("" as upstream).
            num_frames: 1 (text-to-image: temporal blocks off, as upstream's --force_images) or the
                model's frames, 1 + 4 (video_length - 1) (default).
            height, width: pixels (default ``default_size``), multiples of 16.
            num_inference_steps: the scheduler's steps (PNDM runs 9 more model calls: its PRK warm-up).
            guidance_scale: classifier-free guidance, on when > 1; both branches in one batched forward.
            num_videos_per_prompt: videos for each prompt.
            generator: torch.Generator (or one per video) for the initial noise and stochastic steps.
            latents: initial noise (b, C, F, h, w) to use instead of drawing it (scaled by the
                scheduler's init_noise_sigma, as upstream).
            output_type: "uint8" (upstream's), "latent" (or "latents"), "pt", "np".
            text_mask: "upstream" reproduces upstream's VideoGenPipeline: one video is conditioned on
                its caption's k tokens and the negative prompt's first k states (pads included), no
                mask reaches the transformer, and a batch zeroes the captions' pad rows instead,
                so results depend on batch composition. "mask" passes each caption's mask to the
                cross-attention of both branches: results do not depend on the batch. For a model
                trained with caption dropout (config ``learned_null_caption``) and an empty
                negative prompt, the unconditional branch is the learned null caption
                (``transformer.null_caption``: y_embedding's 120 rows, then masked zeros).
            progress: tqdm bars over the steps and the tiled decode; False silences them.
            eta: DDIM's eta (schedulers whose step takes it). clean_caption: upstream's caption cleaning.

        Returns:
            TextToVideoPipelineOutput with ``.video`` (see output_type).
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt={prompt!r:.80}; expected a str or a non-empty list of str")
        prompts = list(prompts)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt={negative_prompt!r:.80}; expected a str (used for every prompt)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        if text_mask not in TEXT_MASKS:
            raise ValueError(f"text_mask={text_mask!r}; expected one of {TEXT_MASKS}")
        for name, v in (("num_inference_steps", num_inference_steps), ("num_videos_per_prompt", num_videos_per_prompt)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}; expected a positive int")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale={guidance_scale!r}; expected a number (guidance is on when > 1)")
        frames, height, width = self.resolve_size(num_frames, height, width)
        image = frames == 1
        s = self.vae.spatial_compression
        cfg = guidance_scale > 1.0
        B = len(prompts) * num_videos_per_prompt

        states, enc_mask = self.encode_prompt(prompts, negative_prompt, num_videos_per_prompt, cfg, text_mask,
                                              clean_caption)
        F = 1 if image else self.transformer.config.video_length
        shape = (B, self.transformer.config.in_channels, F, height // s, width // s)
        latents = self.prepare_latents(shape, generator, latents)
        latents = self._denoise(latents, states, enc_mask, not image, num_inference_steps, float(guidance_scale), cfg,
                                generator, eta, progress)
        if output_type in ("latent", "latents"):
            return TextToVideoPipelineOutput(video=latents)
        return TextToVideoPipelineOutput(video=self.decode_latents(latents, output_type, progress))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vae={type(self.vae).__name__}, transformer={type(self.transformer).__name__}, "
                f"text_encoder={type(self.text_encoder).__name__}, scheduler={scheduler_name(self.scheduler)})")
