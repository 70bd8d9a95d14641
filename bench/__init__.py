"""Benchmark suites for osp ops: ``python -m bench`` (see bench/__main__.py and bench/harness.py)."""
