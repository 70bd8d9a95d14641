"""Build script: the Python packages and, when torch and a C++ compiler are there, the compiled
extension ``osp._C``.

The Triton kernels in the top-level ``kernels/`` folder are installed as ``osp.kernels`` (never as a
top-level ``kernels`` module, which is another PyPI project's name).

The extension is built with ninja through torch.utils.cpp_extension whenever torch is importable at
build time (``pip install --no-build-isolation``, as ``make test`` does) and a C++ compiler exists; a
plain isolated ``pip install .`` has no torch at build time and gives the pure-Python package (osp
then runs its Triton and torch backends). Its library is loaded with torch.ops.load_library (no
Python module init); build metadata (torch version, ISA levels, CUDA archs, ops served) is written
beside it as ``_C.json`` and checked before loading.

CPU kernels (csrc/<op>/<op>_cpu_kernel.cpp) are compiled once per ISA level, each with its own flags
and -DCPU_CAPABILITY=<LEVEL> (as PyTorch builds its own kernels); the level runs that the CPU
supports, never -march=native.

Build switches (environment variables):
  OSP_BUILD_EXT=auto|0|1  auto (default): build when torch and a compiler are there, and fall back to
                          pure Python (with a message) when the build fails; 0: never; 1: a missing
                          torch/compiler or a failed build is an error
  OSP_CPU_ISAS            ISA levels to compile, comma separated: default,avx2,avx512 (the default
                          on x86-64; "default" is always built)
  MAX_JOBS                parallel compile jobs (torch's own variable)
  OSP_BUILD_CUDA=auto|0|1 the CUDA half, a second library osp._C_cuda (csrc/**/*_cuda.{cu,cpp}) that
                          registers CUDA kernels for osp._C's schemas; auto: when torch is a CUDA
                          build and a CUDA toolkit is found; its failure leaves the CPU half usable
  TORCH_CUDA_ARCH_LIST    its architectures (torch's own variable); default: the visible GPUs', else
                          8.0;8.6;8.9;9.0+PTX
At run time OSP_CPU_ISA=default|avx2|avx512 forces one level (osp.ops._ext.set_cpu_isa in tests).
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
HOW_TO_BUILD = ('build it with torch installed: pip install --no-build-isolation -e . (or `make test`); '
                'OSP_BUILD_EXT=1 makes a missing torch or compiler an error')

# Flags of each ISA level, as PyTorch's own (cmake/Codegen.cmake), F16C for the half conversions.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off"]  # fused multiply-adds only where written (bit-stable across levels)
# at::parallel_for is inline OpenMP: without -fopenmp the kernels run on one thread. Linking with it
# adds a DT_NEEDED on libgomp.so.1, which the loader resolves to the libgomp torch already loaded
# (same soname), so torch.set_num_threads governs the kernels too.
OPENMP_FLAGS = ["-fopenmp"] if platform.system() == "Linux" else []


def _say(msg: str) -> None:
    print(f"osp setup: {msg}", file=sys.stderr)


def _mode() -> str:
    mode = os.environ.get("OSP_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"OSP_BUILD_EXT={mode!r}; expected auto, 0 or 1")
    return mode


def _cpu_isas():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    wanted = [s.strip().lower() for s in os.environ.get("OSP_CPU_ISAS", "default,avx2,avx512").split(",") if s.strip()]
    for isa in wanted:
        if isa not in ISA_FLAGS:
            raise SystemExit(f"OSP_CPU_ISAS names {isa!r}; expected a comma list of {', '.join(ISA_FLAGS)}")
    return [isa for isa in ISA_FLAGS if isa in wanted or isa == "default"]


def _served_ops(sources):
    """{dispatch key: [op names]} from the TORCH_LIBRARY_IMPL blocks of ``sources`` (paths under ROOT)."""
    served = {}
    for path in sources:
        text = (ROOT / path).read_text()
        for key, body in re.findall(r"TORCH_LIBRARY_IMPL\(osp_C,\s*(\w+),\s*m\)\s*\{(.*?)\n\}", text, re.S):
            served.setdefault(key, []).extend(re.findall(r'm\.impl\("(\w+)"', body))
    return served


def _cuda_mode() -> str:
    mode = os.environ.get("OSP_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"OSP_BUILD_CUDA={mode!r}; expected auto, 0 or 1")
    return mode


DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # A100/A800, 30xx/A10, 4090/L40, H100/H200 (+PTX for newer)


def _cuda_archs(torch) -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures, else DEFAULT_CUDA_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # no driver: build for the usual targets
        caps = []
    return ";".join(caps) if caps else DEFAULT_CUDA_ARCHS


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception:  # the version is metadata only
        return cxx


def _metadata_name(ext) -> str:
    """osp._C -> _C.json, osp._C_cuda -> _C_cuda.json: written beside the library."""
    return ext.name.rsplit(".", 1)[-1] + ".json"


def extension_modules():
    """([osp._C] (+ osp._C_cuda), {"build_ext": ...}) when the extension is to be built, else ([], {})."""
    mode = _mode()
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp")
                         if not p.name.endswith(("_kernel.cpp", "_cuda.cpp")))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in list(CSRC.rglob("*_cuda.cpp")) + list(CSRC.rglob("*_cuda.cu")))
    kernel_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*_cpu_kernel.cpp"))
    if mode == "0" or not cpu_sources:
        _say("building the pure-Python package (OSP_BUILD_EXT=0)" if mode == "0" else "csrc/ has no sources")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        msg = "torch is not importable at build time, so the compiled extension osp._C is not built; " + HOW_TO_BUILD
        if mode == "1":
            raise SystemExit(msg)
        _say(msg)
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        msg = f"no C++ compiler ({cxx!r} not found), so the compiled extension osp._C is not built"
        if mode == "1":
            raise SystemExit(msg)
        _say(msg)
        return [], {}

    isas = _cpu_isas()
    macros = [(f"OSP_ISA_{isa.upper()}", None) for isa in isas if isa != "default"]
    ext = cpp_extension.CppExtension(
        "osp._C", cpu_sources, define_macros=macros, extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
        extra_link_args=list(OPENMP_FLAGS),
        depends=sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.h")),
        optional=(mode == "auto"),
    )
    ext.osp_kernel_sources, ext.osp_isas = kernel_sources, isas
    ext.osp_metadata = {
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cpu_isas": isas,
        "openmp": bool(OPENMP_FLAGS),
        "cuda": False,
        "cuda_archs": [],
        "ops": _served_ops(cpu_sources),
        "compiler": _compiler_version(cxx),
        "platform": platform.machine(),
    }

    exts = [ext]
    cuda_mode = _cuda_mode()
    if cuda_sources and cuda_mode != "0":
        missing = ("torch is a CPU build" if torch.version.cuda is None else
                   "no CUDA toolkit (CUDA_HOME)" if cpp_extension.CUDA_HOME is None else None)
        if missing is None:
            archs = _cuda_archs(torch)
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch.utils.cpp_extension reads it
            cext = cpp_extension.CUDAExtension(
                "osp._C_cuda", cuda_sources, depends=ext.depends,
                extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": ["-O3"]},
                optional=(cuda_mode != "1"),
            )
            cext.osp_metadata = dict(ext.osp_metadata, cuda=True, cuda_archs=archs.split(";"),
                                     cuda_version=torch.version.cuda, ops=_served_ops(cuda_sources))
            exts.append(cext)
        elif cuda_mode == "1":
            raise SystemExit(f"OSP_BUILD_CUDA=1 but {missing}")
        else:
            _say(f"building osp._C without its CUDA half ({missing}); GPUs use the Triton kernels")

    class BuildExtension(cpp_extension.BuildExtension):
        """Compiles each *_cpu_kernel.cpp once per ISA level, with that level's flags, in parallel
        (each level's objects in a folder of their own), links them with the other sources, and
        writes _C.json beside the library."""

        def build_extension(self, ext):
            try:
                self._build(ext)
            except Exception as exc:  # ninja's failure is a RuntimeError, which `optional` does not cover
                if not ext.optional:
                    raise
                _say(f"building osp._C failed ({type(exc).__name__}: {exc}); installing without it "
                     "(osp runs its Triton and torch backends). OSP_BUILD_EXT=1 makes this an error")

        def _build(self, ext):
            if getattr(ext, "osp_kernel_sources", None):
                cflags = list(ext.extra_compile_args["cxx"])

                def compile_level(isa):
                    level = [f"-DCPU_CAPABILITY={isa.upper()}", f"-DCPU_CAPABILITY_{isa.upper()}"] + ISA_FLAGS[isa]
                    return self.compiler.compile(
                        ext.osp_kernel_sources, output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                        macros=ext.define_macros, include_dirs=ext.include_dirs,
                        extra_postargs={"cxx": cflags + level}, depends=ext.depends,
                    )

                jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
                with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(ext.osp_isas)))) as pool:
                    objects = [o for objs in pool.map(compile_level, ext.osp_isas) for o in objs]
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)
            if getattr(ext, "osp_metadata", None):
                meta = Path(self.get_ext_fullpath(ext.name)).with_name(_metadata_name(ext))
                meta.write_text(json.dumps(ext.osp_metadata, indent=1) + "\n")

        # The metadata travels with the library: into the source tree (--inplace, editable installs)
        # and into installs.
        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            for regular, inplace in self._metadata_pairs():
                if Path(regular).exists():
                    self.copy_file(regular, inplace, level=self.verbose)

        def _get_output_mapping(self):
            yield from super()._get_output_mapping()
            if self.inplace:
                yield from self._metadata_pairs()

        def _metadata_pairs(self):
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace, regular = self._get_inplace_equivalent(build_py, ext)
                name = _metadata_name(ext)
                yield str(Path(regular).with_name(name)), str(Path(inplace).with_name(name))

        def get_outputs(self):
            outputs = super().get_outputs()
            if self.inplace:
                return outputs
            return outputs + [str(Path(self.get_ext_fullpath(e.name)).with_name(_metadata_name(e)))
                              for e in self.extensions]

    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import it
    ext_modules, cmdclass = extension_modules()
    setup(
        packages=find_packages(include=["osp", "osp.*"]) + ["osp.kernels"],
        package_dir={"osp.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
