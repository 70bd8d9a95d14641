"""Strict checkpoint loading shared by osp's models: diffusers directories, single weight files,
Lightning ``.ckpt`` files and Hub repos, where every missing, unexpected or mis-shaped key is an
error naming it. ``StrictLoadingMixin`` gives a model its ``from_pretrained``."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_weights(path: str, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file or a torch pickle (.ckpt/.bin/.pt/.pth); a Lightning
    checkpoint's weights are under "state_dict"."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"cannot read weights from {path!r}: expected a .safetensors, .ckpt, .bin, .pt or .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        if weights_only:
            raise ValueError(
                f"{path!r} could not be read with torch.load(weights_only=True) ({exc}); if you trust the file, "
                "pass weights_only=False"
            ) from exc
        raise
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors, or one under 'state_dict')")
    return dict(obj)


def read_config(config) -> dict:
    """A config dict from a dict, a path to a json file, or a directory holding config.json."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"config={config!r}; expected a dict, a path to a config.json, or a directory holding one")


def weights_names(variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> Tuple[str, ...]:
    """The weight file names of a model directory, in the order they are looked for (diffusers' names;
    a variant such as "fp16" goes before the suffix)."""
    names = WEIGHTS_NAMES
    if use_safetensors is not None:
        names = tuple(n for n in names if n.endswith(".safetensors") == use_safetensors)
    if variant:
        names = tuple(n.replace(".", f".{variant}.", 1) for n in names)
    return names


def locate(path, subfolder: Optional[str] = None, config=None, variant: Optional[str] = None,
           use_safetensors: Optional[bool] = None, **hub_kwargs) -> Tuple[dict, str]:
    """(config dict, weights file) for a model directory, a single weights file (its config comes from
    ``config`` or a config.json beside it) or a Hugging Face Hub repo id."""
    path = os.fspath(path)
    local = os.path.join(path, subfolder) if subfolder else path
    names = weights_names(variant, use_safetensors)
    if os.path.isdir(local):
        weights = next((os.path.join(local, n) for n in names if os.path.isfile(os.path.join(local, n))), None)
        if weights is None:
            raise ValueError(f"no weights in {local!r}: expected one of {list(names)}")
        return read_config(config if config is not None else local), weights
    if os.path.isfile(local):
        if config is None:
            beside = os.path.join(os.path.dirname(os.path.abspath(local)), CONFIG_NAME)
            if not os.path.isfile(beside):
                raise ValueError(
                    f"{local!r} holds weights only; pass config= (a dict or a config.json path) or put a "
                    f"{CONFIG_NAME} beside it"
                )
            config = beside
        return read_config(config), local
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise ValueError(f"{local!r} does not exist (expected a model directory, a weights file or a hub repo id 'owner/name')")
    return _from_hub(path, subfolder, config, names, **hub_kwargs)


def _from_hub(repo_id: str, subfolder, config, names, **hub_kwargs) -> Tuple[dict, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if config is None:
        config = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **kwargs)
    for name in names:
        try:
            return read_config(config), hf_hub_download(repo_id, name, subfolder=subfolder, **kwargs)
        except EntryNotFoundError:
            continue
    raise ValueError(f"no weights in hub repo {repo_id!r} (subfolder {subfolder!r}): expected one of {list(names)}")


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                     ignored_prefixes: Tuple[str, ...] = ()) -> Dict[str, torch.Tensor]:
    """Drop ignored training-only keys, then demand exactly the model's keys with its shapes.

    Returns the filtered state dict; raises ValueError naming every missing, unexpected or
    mis-shaped key.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignored_prefixes)}
    expected = model.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    shapes = [f"{k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]))
    if problems:
        raise ValueError(f"{type(model).__name__}: {source} does not match the model's config: " + "; ".join(problems))
    return sd


class StrictLoadingMixin:
    """``from_pretrained`` for a diffusers ModelMixin + ConfigMixin model (list it first among the
    bases). Subclasses set ``UPSTREAM_CLASS_NAMES`` (config ``_class_name`` values accepted besides
    their own), ``IGNORED_KEY_PREFIXES`` (training-only checkpoint keys to drop) and may override
    ``_after_load`` (e.g. to rebuild non-persistent buffers on the meta-built model)."""

    UPSTREAM_CLASS_NAMES: Tuple[str, ...] = ()
    IGNORED_KEY_PREFIXES: Tuple[str, ...] = ()

    def _after_load(self, device, dtype: Optional[torch.dtype]) -> None:
        """Called once the checkpoint's tensors are in place."""

    @classmethod
    def _checked_config(cls, config: dict, overrides: dict) -> dict:
        name = config.get("_class_name")
        if name is not None and name not in cls.UPSTREAM_CLASS_NAMES + (cls.__name__,):
            raise ValueError(f"config has _class_name {name!r}; expected {cls.__name__!r}"
                             + (f" or upstream's {cls.UPSTREAM_CLASS_NAMES[0]!r}" if cls.UPSTREAM_CLASS_NAMES else ""))
        known = set(cls._get_init_keys(cls)) - {"self"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_pretrained: unknown arguments or config fields {unknown}; "
                             f"config fields are {sorted(known)}")
        return {**config, **overrides}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, config=None, subfolder: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None, device=None,
                        weights_only: bool = True, variant: Optional[str] = None,
                        use_safetensors: Optional[bool] = None, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, token: Optional[str] = None,
                        local_files_only: Optional[bool] = None, force_download: Optional[bool] = None,
                        low_cpu_mem_usage: Optional[bool] = None, **config_overrides):
        """Load a model, strictly: every key the model expects must be present with its shape, and any
        other key is an error naming it (the class's ``IGNORED_KEY_PREFIXES`` are dropped first).

        Args:
            pretrained_model_name_or_path: a directory with config.json and
                diffusion_pytorch_model.safetensors (or .bin), as upstream's release and
                ``save_pretrained`` write; a single weights file (.safetensors, or a Lightning .ckpt
                whose weights are under "state_dict"), whose config comes from ``config`` or a
                config.json beside it; or a Hugging Face Hub repo id (with ``subfolder``).
            config: a config dict or path to a config.json, overriding the one found with the weights.
            torch_dtype: dtype of the loaded parameters (default float32). device: where to put them.
            weights_only: passed to torch.load for pickled checkpoints; set False only for a trusted
                file that holds other objects (some Lightning checkpoints do).
            variant, use_safetensors: which weight file of a directory to read, as in diffusers.
            revision, cache_dir, token, local_files_only, force_download: Hub download options.
            low_cpu_mem_usage: accepted for diffusers compatibility; loading never initializes weights
                (the model is built on the meta device and takes the checkpoint's tensors).
            config_overrides: config fields to replace.
        """
        cfg, weights_path = locate(
            pretrained_model_name_or_path, subfolder=subfolder, config=config, variant=variant,
            use_safetensors=use_safetensors, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, force_download=force_download,
        )
        cfg = cls._checked_config(cfg, config_overrides)
        with torch.device("meta"):
            model = cls.from_config(cfg)
        state_dict = check_state_dict(model, read_weights(weights_path, weights_only=weights_only),
                                      source=repr(weights_path), ignored_prefixes=cls.IGNORED_KEY_PREFIXES)
        dtype = torch_dtype or torch.float32
        state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        model._after_load(device, torch_dtype)
        model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return model.eval()
