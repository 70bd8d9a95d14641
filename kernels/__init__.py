"""Triton kernels, one file per op; installed as osp.kernels. Imported only when a Triton backend runs."""
