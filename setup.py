"""Build script: the Python packages and, when csrc/ holds sources, the compiled extension.

The Triton kernels in the top-level ``kernels/`` folder are installed as ``osp.kernels`` (never as a
top-level ``kernels`` module, which is another PyPI project's name).

Build switches (environment variables):
  OSP_BUILD_EXT=0      skip the compiled extension
  OSP_FORCE_CUDA=1     build the CUDA half even when no GPU is visible
  TORCH_CUDA_ARCH_LIST target architectures (torch's own variable), e.g. "9.0"
  MAX_JOBS             parallel compile jobs (torch's own variable)
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def extension_modules():
    """The ``osp._C`` extension built from csrc/ (pybind11 through torch.utils.cpp_extension)."""
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources or os.environ.get("OSP_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils import cpp_extension  # needs --no-build-isolation so torch is importable

    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    use_cuda = bool(cuda_sources) and (
        os.environ.get("OSP_FORCE_CUDA") == "1" or cpp_extension.CUDA_HOME is not None
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension("osp._C", sources + cuda_sources, define_macros=[("OSP_WITH_CUDA", None)])
    else:
        ext = cpp_extension.CppExtension("osp._C", sources)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["osp", "osp.*"]) + ["osp.kernels"],
    package_dir={"osp.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
