# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
# `make gpu-check` is for a machine with a GPU and no network: it uses that machine's python3.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip install --disable-pip-version-check -q
STAMP  := $(VENV)/.osp-setup
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

# torch: the CPU build 2.13.0 when there is no GPU (an unpinned torch pulls a multi-GB CUDA build);
# triton 3.9.0 runs the kernels through its interpreter on CPU.
ifeq ($(HAS_GPU),1)
TORCH_REQ := torch
else
TORCH_REQ := torch==2.13.0 triton==3.9.0
endif

.PHONY: setup test demo bench gpu-check clean

setup: $(STAMP)

# osp itself installs with --no-build-isolation, so setup.py sees this venv's torch and builds the
# compiled extension osp._C (csrc/) with ninja; OSP_BUILD_EXT=0 in the environment skips it.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade "pip>=23" "setuptools>=64"
	$(PIP) $(TORCH_REQ) numpy ninja
	$(PIP) --no-build-isolation -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VPY) -m osp demo

bench: $(STAMP)
	$(VPY) -m bench

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
