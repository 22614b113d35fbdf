"""Build script for xray-ops.

The Python package always installs. csrc/ is compiled into the extension ``xray_ops._C``
only when nvcc and a CUDA build of torch are present; otherwise the build warns and the
``cuda`` backend reports itself unavailable (see ``python -m xray_ops info``).

Build contract (environment variables):
  XRAY_OPS_SKIP_CUDA_BUILD=1   never build csrc/
  XRAY_OPS_FORCE_CUDA_BUILD=1  build csrc/ even when the checks below would skip it (fail loudly)
  XRAY_OPS_CUDA_ARCHS          ";"-separated compute capabilities, default "80;90"; 90 builds sm_90a;
                               PTX for the newest is embedded too (newer GPUs JIT-compile it)
  MAX_JOBS                     parallel compile jobs (default: from cores and free memory)
  CUDA_HOME                    the toolkit; found from nvcc when unset (see _resolve_cuda_home)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home() -> str | None:
    """Find the CUDA toolkit before torch.utils.cpp_extension guesses it.

    cpp_extension takes CUDA_HOME as the parent of the folder holding `nvcc`; on machines where
    `nvcc` on the PATH is a small wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)
    that guess is wrong and linking fails on -lcudart. So: honour CUDA_HOME, else follow the
    wrapper to the real compiler, else fall back to /usr/local/cuda.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: look for the nvcc it execs
                m = re.search(rb"(/\S+/bin/nvcc)\b", head)
                if m:
                    real = os.path.realpath(m.group(1).decode())
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(
            os.path.join(home, "include")
        ):
            return home
    return None


def _pip_cuda_include_dirs(cuda_home: str | None) -> list[str]:
    """Headers of CUDA libraries that torch's headers include (cusparse.h, cublas_v2.h, ...)
    but a minimal toolkit may lack: pip's nvidia-* wheels ship them."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    return dirs


def _gencode_flags(archs: str) -> tuple[list[str], str]:
    """nvcc -gencode flags and the target names the extension records (``_C.cuda_archs()``).

    One cubin per listed arch, plus PTX for the newest, so GPUs newer than every listed arch
    JIT-compile it instead of failing with "no kernel image" (the cuda backend's reasons
    compare a device with these names: xray_ops/_ext.py). The PTX is the portable compute_XY,
    never an arch-specific compute_XYa, which runs on that one arch only.
    """
    flags, names, numbers = [], [], []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if not a:
            continue
        if not a.isdigit():
            raise ValueError(f"XRAY_OPS_CUDA_ARCHS: expected numbers like '80;90', got {archs!r}")
        numbers.append(int(a))
        if a == "90":  # Hopper: the 'a' variant unlocks wgmma / setmaxnreg
            flags += ["-gencode", "arch=compute_90a,code=sm_90a"]
            names.append("sm_90a")
        else:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            names.append(f"sm_{a}")
    if numbers:
        newest = max(numbers)
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        names.append(f"compute_{newest}")
    return flags, ";".join(names)


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:  # nvcc on template-heavy files takes ~2-3 GB per job
        with open("/proc/meminfo") as f:
            avail_kb = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))
    except (OSError, StopIteration):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


def _extensions():
    if _truthy("XRAY_OPS_SKIP_CUDA_BUILD"):
        print("xray-ops: XRAY_OPS_SKIP_CUDA_BUILD=1, not building csrc/", file=sys.stderr)
        return [], {}
    force = _truthy("XRAY_OPS_FORCE_CUDA_BUILD")
    cuda_home = _resolve_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        if force:
            raise
        warnings.warn(f"xray-ops: torch not importable at build time ({e}); cuda backend disabled")
        return [], {}
    reasons = []
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (nvcc / CUDA_HOME)")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if reasons and not force:
        warnings.warn("xray-ops: not building csrc/: " + "; ".join(reasons))
        return [], {}
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    gencode, arch_names = _gencode_flags(os.environ.get("XRAY_OPS_CUDA_ARCHS", "80;90"))
    sources = sorted(
        glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
        + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
    )
    define = [("XRAY_OPS_CUDA_ARCHS", f'"{arch_names}"')]
    include_dirs = [os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs(cuda_home)
    ext = CUDAExtension(
        name="xray_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define,
        extra_compile_args={
            # no -std flag: torch's cpp_extension picks the standard its headers need
            # (C++17 for older torch, C++20 for 2.10+)
            "cxx": ["-O3"],
            "nvcc": [
                "-O3",
                "--expt-relaxed-constexpr",
                "--use_fast_math",
                "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            ]
            + gencode,
        },
    )
    print(f"xray-ops: building csrc/ for {arch_names} with MAX_JOBS={os.environ['MAX_JOBS']}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="xray-ops",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for vision transformers: EViT, ToMe, flash "
    "attention with CLS row and key bias, int8 inference",
    # BSD-3-Clause, as xformers and flash-attention (an SPDX expression: no license classifier)
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # reference_model: the reference Xray-Visual model, its data, training and evaluation (a
    # top-level package that uses only xray_ops' public API)
    packages=find_packages(include=["xray_ops", "xray_ops.*", "reference_model",
                                    "reference_model.*"]) + ["xray_ops.kernels"],
    package_dir={"xray_ops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "cpu": ["numba>=0.59"],
        "nvtx": ["nvtx"],
        "bench": ["matplotlib", "tqdm", "rich"],
        # the reference model: text towers (open_clip's BPE tokenizer, a frozen Hugging Face
        # encoder), openclipart rendering, YAML configs, webdataset shards, checkpoints
        "model": ["timm", "open_clip_torch", "transformers", "safetensors", "cairosvg", "pyyaml",
                  "webdataset", "tqdm", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "xray-train = reference_model.train.__main__:main",
            "xray-eval = reference_model.eval.__main__:main",
        ],
    },
    zip_safe=False,
)
