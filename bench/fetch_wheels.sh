#!/usr/bin/env bash
# Run HERE (a machine with package-registry access) before a GPU check: downloads into .whl/ the
# wheels the lent GPU machine lacks (it has torch, triton, pytest, safetensors, huggingface_hub,
# pillow, regex, requests, but no diffusers, PyAV or accelerate), for its Python 3.12. Then call the device with
# carry [".whl"] (ignored by .gitignore) and the command `make gpu-check`; bench/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "diffusers==0.42.1" "importlib_metadata" "zipp" \
    "av" "accelerate" "psutil" "pyyaml" "beautifulsoup4" "soupsieve" "ftfy" "wcwidth"
ls -la .whl
