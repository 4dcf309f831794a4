"""Builds moe_comm._C.

The torch-free CUDA sources (csrc/kernels/*.cu) are compiled by nvcc in a step of our own and
linked into the extension, so device code builds even against a CPU-only torch (whose
cpp_extension refuses .cu files). Whether to build CUDA depends on finding nvcc, never on
torch.cuda.is_available(). Environment variables: see README.md.
"""

import concurrent.futures
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "90"  # H100/H200; "80;90" adds A100


def _log(msg):
    print(f"[moe_comm build] {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """A CUDA toolkit with nvcc and the runtime headers, or None (then: CPU part only)."""
    if os.environ.get("MOE_COMM_WITH_CUDA", "1") == "0":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))):
            return home
    return None


def find_nccl_home():
    """The nvidia-nccl wheel's folder (include/, lib/), or $NCCL_HOME."""
    home = os.environ.get("NCCL_HOME")
    if home:
        return home
    spec = importlib.util.find_spec("nvidia.nccl")
    if spec and spec.submodule_search_locations:
        for path in spec.submodule_search_locations:
            if os.path.exists(os.path.join(path, "include", "nccl.h")):
                return path
    return None


def cuda_archs():
    raw = os.environ.get("MOE_COMM_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise SystemExit(f"MOE_COMM_CUDA_ARCHS={raw!r}: expected e.g. '90' or '80;90'")
    return archs


CUDA_HOME = find_cuda_home()
NCCL_HOME = find_nccl_home() if CUDA_HOME else None
ARCHS = cuda_archs() if CUDA_HOME else []

sources = [os.path.relpath(p, ROOT) for p in
           sorted(glob.glob(os.path.join(CSRC, "bindings", "*.cpp")))
           + sorted(glob.glob(os.path.join(CSRC, "core", "*.cpp")))
           + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))]
define_macros = []
include_dirs = [CSRC]
extra_link_args = []
libraries = []
if CUDA_HOME:
    define_macros += [("MOE_COMM_WITH_CUDA", None),
                      ("MOE_COMM_CUDA_ARCHS", '"' + ";".join(f"sm_{a}" for a in ARCHS) + '"')]
    include_dirs.append(os.path.join(CUDA_HOME, "include"))
    libraries += ["dl", "rt", "pthread"]
if NCCL_HOME:
    define_macros.append(("MOE_COMM_WITH_NCCL", None))
    include_dirs.append(os.path.join(NCCL_HOME, "include"))
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(CSRC, "comm", "*.cpp")))]
    nccl_lib = os.path.join(NCCL_HOME, "lib")
    # The wheel's libnccl.so.2 next to our package first (the one a CUDA torch loads too),
    # then the folder found at build time.
    extra_link_args += [f"-L{nccl_lib}", "-l:libnccl.so.2",
                        "-Wl,-rpath,$ORIGIN/../nvidia/nccl/lib", f"-Wl,-rpath,{nccl_lib}"]


class BuildWithNvcc(BuildExtension):
    """Compiles csrc/kernels/*.cu with nvcc first, then links the objects into the extension."""

    def build_extensions(self):
        _log(f"torch {__import__('torch').__version__}, python {sys.version.split()[0]}")
        if CUDA_HOME:
            objects = self._compile_cuda()
            cudart = os.path.join(CUDA_HOME, "lib64", "libcudart_static.a")
            if not os.path.exists(cudart):
                cudart = os.path.join(CUDA_HOME, "lib", "libcudart_static.a")
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objects + [cudart]
            _log(f"CUDA: {CUDA_HOME}, archs {', '.join('sm_' + a for a in ARCHS)}, "
                 f"{len(objects)} kernel object(s), cudart static")
        else:
            _log("CUDA: nvcc not found (or MOE_COMM_WITH_CUDA=0): building the CPU part only")
        _log(f"NCCL: {NCCL_HOME or 'not found: no NCCL support (pip install nvidia-nccl-cu13)'}")
        super().build_extensions()

    def _compile_cuda(self):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(out_dir, exist_ok=True)
        gencode = []
        for i, arch in enumerate(ARCHS):
            codes = f"sm_{arch}" + (f",compute_{arch}" if i == len(ARCHS) - 1 else "")
            gencode += ["-gencode", f"arch=compute_{arch},code=[{codes}]"]
        jobs = []
        for cu in sorted(glob.glob(os.path.join(CSRC, "kernels", "*.cu"))):
            obj = os.path.join(out_dir, os.path.basename(cu) + ".o")
            cmd = [nvcc, "-c", cu, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "-DMOE_COMM_WITH_CUDA", f"-I{CSRC}", *gencode]
            jobs.append((cmd, obj))
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for (cmd, _), result in zip(jobs, pool.map(
                    lambda job: subprocess.run(job[0], capture_output=True, text=True), jobs), strict=True):
                if result.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {cmd[2]}:\n{result.stdout}{result.stderr}")
        return [obj for _, obj in jobs]


setup(
    name="moe_comm",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts dispatch/combine for PyTorch",
    packages=find_packages(include=["moe_comm", "moe_comm.*"]),
    python_requires=">=3.10",
    ext_modules=[CppExtension(
        "moe_comm._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        libraries=libraries,
        extra_compile_args=["-O3", "-std=c++17"],
        extra_link_args=extra_link_args,
    )],
    cmdclass={"build_ext": BuildWithNvcc},
)
