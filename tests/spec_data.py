"""Upstream facts from ../shared/spec/, copied verbatim into tests/data/ so a clone tests alone.

``test_data_files_are_the_spec_files`` (tests/test_vae.py) checks the copies against the spec folder
when it sits beside the checkout.
"""
import ast
import json
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared", "spec")
FILES = ("osp-v1.0-vae-config.json", "osp-v1.0-vae-state-dict.txt", "osp-v1.0-latte-t2v-state-dict-2-layers.txt")


def read(name: str) -> str:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return f.read()


def state_dict_list(name: str):
    """[(key, shape)] from a spec listing of lines "name (d0, d1, ...)"."""
    out = []
    for line in read(name).strip().splitlines():
        key, shape = line.split(" ", 1)
        out.append((key, tuple(ast.literal_eval(shape))))
    return out


# Upstream's released VAE config.json and state-dict listing, and LatteT2V's 2-layer listing.
VAE_RELEASE_CONFIG = json.loads(read("osp-v1.0-vae-config.json"))
VAE_RELEASE_STATE_DICT = state_dict_list("osp-v1.0-vae-state-dict.txt")
LATTE_T2V_2_LAYER_KEYS = state_dict_list("osp-v1.0-latte-t2v-state-dict-2-layers.txt")
