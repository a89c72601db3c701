"""Build of transmix-kernels and its optional C++/CUDA extension ``transmix_kernels._C``.

Driven by environment flags (never by ``sys.argv``), in the style of flash-attention/xformers:

- ``TRANSMIX_SKIP_EXT=1``: build no extension at all; the package falls back to PyTorch.
- ``TRANSMIX_FORCE_CUDA=1``: build the CUDA sources even when torch sees no GPU (CI, build hosts).
  Without it, CUDA sources are built when a CUDA toolkit is found and torch is a CUDA build.
- ``TRANSMIX_SKIP_CUDA=1``: build the C++ (CPU) extension only, even where a toolkit is found.
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures, e.g. ``"9.0"``; default below.
- ``CUDA_HOME``: the toolkit; otherwise it is found from ``nvcc`` on PATH or /usr/local/cuda.
- ``MAX_JOBS``: parallel compile jobs (ninja).

The extension needs torch at build time: install with ``pip install --no-build-isolation .``.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, looked for where it really is (torch would guess /usr/local)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        # A toolkit root has the compiler and the runtime headers: an nvcc wrapper script in
        # /usr/local/bin must not make /usr/local look like one (linking -lcudart would fail).
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
    return None


def _extensions():
    if _flag("TRANSMIX_SKIP_EXT"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu"))
    if not sources:
        return [], {}
    # A CUDA build of torch plus a toolkit is enough: the build host needs no GPU.
    build_cuda = not _flag("TRANSMIX_SKIP_CUDA") and (
        _flag("TRANSMIX_FORCE_CUDA") or (cuda_home is not None and torch.version.cuda is not None)
    )
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 since
    # torch 2.10) whenever none is given, and an explicit older one breaks the build.
    cxx_flags = ["-O3"]
    link_flags = []
    # at::parallel_for is a header template: without -fopenmp it silently runs on one thread.
    # The extension then binds to the libgomp.so.1 that torch already loaded.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if build_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        ext = CUDAExtension(
            "transmix_kernels._C",
            sources + cuda_sources,
            define_macros=[("TRANSMIX_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "transmix_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _packages() -> tuple[list[str], dict[str, str]]:
    """The kernel library at the top, the trainer from ``python/``; the trainer's YAML configs are
    package data of ``transmix_train.configs`` (below), so ``transmix-train`` finds its default
    config in any install, editable or not."""
    packages = find_packages(include=["transmix_kernels", "transmix_kernels.*"])
    trainer = find_packages("python", include=["transmix_train", "transmix_train.*"])
    return packages + trainer, {name: "python/" + name.replace(".", "/") for name in trainer}


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"transmix_train.configs": ["*.yaml"], "transmix_train.configs.grids": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
