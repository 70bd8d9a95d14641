"""What osp's models share (``OspModelMixin``): strict checkpoint loading (diffusers directories,
single weight files, Lightning ``.ckpt`` files and Hub repos, where every missing, unexpected or
mis-shaped key is an error naming it), upstream configs with missing fields, dtype and device moves,
and gradient-checkpointed calls (``Checkpointed``).

The dtype rule: a model computes in its parameters' dtype (diffusers' convention). Inputs are cast
to it on entry and outputs come back in it; under ``torch.autocast`` the ops follow autocast as
their torch counterparts do.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.utils.checkpoint
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_weights(path: str, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file or a torch pickle (.ckpt/.bin/.pt/.pth); a Lightning
    checkpoint's weights are under "state_dict"."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError, or an OSError on a short read
            raise ValueError(f"weights file {path!r} is incomplete or corrupt ({exc}); expected a whole "
                             ".safetensors file: download or copy it again") from exc
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"cannot read weights from {path!r}: expected a .safetensors, .ckpt, .bin, .pt or .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, OSError) as exc:  # zip reader failures of a cut or damaged file
        if "Weights only load failed" not in str(exc):
            raise ValueError(f"weights file {path!r} is incomplete or corrupt ({exc}); expected a whole torch "
                             "checkpoint: download or copy it again") from exc
        raise ValueError(
            f"{path!r} could not be read with torch.load(weights_only=True) ({exc}); if you trust the file, "
            "pass weights_only=False"
        ) from exc
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
    looked = f"{local!r} (absolute: {os.path.abspath(local)!r})"
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise ValueError(f"{looked} does not exist; expected a model directory, a weights file or a hub repo id "
                         "'owner/name'")
    return _from_hub(path, subfolder, config, names, looked, **hub_kwargs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a TCP connection within ``timeout`` (an offline machine otherwise
    waits through huggingface_hub's retries before failing)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str, subfolder, config, names, looked: str, **hub_kwargs) -> Tuple[dict, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if not kwargs.get("local_files_only") and not _hub_reachable():
        kwargs["local_files_only"] = True  # the Hub cache may still hold it
    try:
        if config is None:
            config = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **kwargs)
    except Exception as exc:
        where = "the Hub is unreachable from here and its local cache lacks it" if kwargs.get("local_files_only") \
            else f"the Hub answered: {type(exc).__name__}"
        raise ValueError(f"{looked} is not a local folder or file, and {repo_id!r} could not be fetched as a hub "
                         f"repo id ({where}); expected a model directory, a weights file or a reachable hub "
                         "repo id") from exc
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


class Checkpointed(nn.Module):
    """A module that runs its blocks through ``checkpointed(block, *args)``: under activation
    checkpointing when ``gradient_checkpointing`` is set (by the model's
    ``enable_gradient_checkpointing``) and gradients are on, else directly."""

    gradient_checkpointing = False
    _gradient_checkpointing_func: Optional[Callable] = None

    def checkpointed(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self._gradient_checkpointing_func is not None:
                return self._gradient_checkpointing_func(block, *args)
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class OspModelMixin:
    """Shared behaviour of osp's diffusers models (list it first among the bases, before ModelMixin).

    - ``from_pretrained``: strict loading (below).
    - Upstream configs: a config whose ``_class_name`` is one of ``UPSTREAM_CLASS_NAMES`` takes
      ``UPSTREAM_DEFAULTS`` (upstream's constructor defaults) for every field it lacks, as upstream's
      ``from_config`` would; osp's own configs keep osp's defaults.
    - ``IGNORED_KEY_PREFIXES``: training-only checkpoint keys to drop; ``_after_load`` may rebuild
      non-persistent buffers on the meta-built model.
    - ``enable_gradient_checkpointing`` / ``disable_gradient_checkpointing`` switch every
      ``Checkpointed`` submodule, the same on every diffusers version.
    - ``to`` is ``nn.Module.to``.
    """

    UPSTREAM_CLASS_NAMES: Tuple[str, ...] = ()
    UPSTREAM_DEFAULTS: Mapping[str, object] = {}
    IGNORED_KEY_PREFIXES: Tuple[str, ...] = ()

    def _after_load(self, device, dtype: Optional[torch.dtype]) -> None:
        """Called once the checkpoint's tensors are in place."""

    def to(self, *args, **kwargs):
        # diffusers' ModelMixin.to warns about fp32-pinned modules on every dtype cast even when
        # there are none; these models have none and need nothing beyond nn.Module.to.
        return nn.Module.to(self, *args, **kwargs)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Optional[Callable] = None) -> None:
        """Recompute block activations in backward: torch.utils.checkpoint (use_reentrant=False), or
        ``gradient_checkpointing_func(block, *args)`` when given."""
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = gradient_checkpointing_func

    def disable_gradient_checkpointing(self) -> None:
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, Checkpointed))

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        if config_dict.get("_class_name") in cls.UPSTREAM_CLASS_NAMES:
            config_dict = {**cls.UPSTREAM_DEFAULTS, **config_dict}
        return super().extract_init_dict(config_dict, **kwargs)

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
