"""Builds moe_comm._C.

The torch-free CUDA sources (csrc/kernels/*.cu) are compiled by nvcc in a step of our own and
linked into the extension, so device code builds even against a CPU-only torch (whose
cpp_extension refuses .cu files). Whether to build CUDA depends on finding nvcc, never on
torch.cuda.is_available(). Environment variables: see README.md.

Build with `pip install --no-build-isolation .` (or `-e .`): the extension is compiled against,
and only works with, the torch of the environment it is installed into (see pyproject.toml).

Importing this file has no side effects (tests/test_packaging.py tests its helpers); the build
runs when it is executed as __main__, which is how pip's setuptools backend runs it.
"""

import concurrent.futures
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "90"  # H100/H200; "80;90" adds A100
# The NCCL wheels, by CUDA major version (their files: nvidia/nccl/{include,lib}).
NCCL_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")
NCCL_HINT = "pip install nvidia-nccl-cu13 (CUDA 13; nvidia-nccl-cu12 for CUDA 12), then rebuild"

NO_TORCH_MESSAGE = """\
moe_comm: torch is not importable in this build environment ({error}).
moe_comm is compiled against the torch installed where you run it. Install torch first, then
build with pip's build isolation off:

    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)

A plain `pip install .` (or `python -m build`) builds in an isolated environment without your
torch: it would have to download another one (~3 GB with CUDA) and build against a torch other
than the one you run, so moe_comm does not ask for one there and stops here instead."""


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
    """$NCCL_HOME, else the nvidia-nccl wheel's folder (include/, lib/), else None."""
    home = os.environ.get("NCCL_HOME")
    if home:
        return home
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ImportError:  # no `nvidia` package at all (find_spec imports the parent first)
        return None
    if spec and spec.submodule_search_locations:
        for path in spec.submodule_search_locations:
            if os.path.exists(os.path.join(path, "include", "nccl.h")):
                return path
    return None


def nccl_wheel_of(nccl_home):
    """The name of the installed nvidia-nccl wheel that nccl_home belongs to, or None (an NCCL
    from elsewhere, e.g. NCCL_HOME=/usr/local/nccl)."""
    from importlib import metadata
    for name in NCCL_WHEELS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        folder = os.path.join(str(dist.locate_file("")), "nvidia", "nccl")
        if os.path.isdir(folder) and os.path.samefile(folder, nccl_home):
            return name
    return None


def nccl_link_args(nccl_home, from_wheel, in_place):
    """Link flags for libnccl.so.2 and where the loader looks for it.

    From the wheel, a regular install (the wheel we build, `pip install .`) records only
    $ORIGIN/../nvidia/nccl/lib: our _C.so lies in site-packages/moe_comm/ and the NCCL wheel in
    site-packages/nvidia/nccl/lib of the same environment, so the path is right wherever that
    environment is, and the build environment's absolute path (often a temporary folder) is not
    baked in. An in-place (editable) build also records the absolute folder: its _C.so stays in
    the source tree, where $ORIGIN/.. is not site-packages, and it only runs with the environment
    it was built in anyway. An NCCL that is not the wheel (NCCL_HOME) is found by its absolute
    folder, the one the user named.
    """
    lib = os.path.join(nccl_home, "lib")
    args = [f"-L{lib}", "-l:libnccl.so.2"]
    if from_wheel:
        args.append("-Wl,-rpath,$ORIGIN/../nvidia/nccl/lib")
    if in_place or not from_wheel:
        args.append(f"-Wl,-rpath,{lib}")
    return args


def cuda_archs():
    raw = os.environ.get("MOE_COMM_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise SystemExit(f"MOE_COMM_CUDA_ARCHS={raw!r}: expected e.g. '90' or '80;90'")
    return archs


def _version_tuple(version):
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if not match:
        raise SystemExit(f"moe_comm: cannot read torch's version {version!r}")
    return int(match.group(1)), int(match.group(2))


def header_cxx_minimum(include_dirs):
    """The C++ standard torch's headers insist on (ATen/ATen.h and torch/all.h `#error` unless
    __cplusplus >= N), as 17, 20, ...; 0 where no such check is found."""
    newest = 0
    for folder in include_dirs:
        for header in ("ATen/ATen.h", "torch/all.h", "torch/csrc/api/include/torch/all.h"):
            path = os.path.join(folder, header)
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(8192)
            for year in re.findall(r"__cplusplus\s*<\s*(\d{4})\d{2}L", text):
                newest = max(newest, int(year) % 100)
    return newest


def cxx_standard(torch_version, include_dirs):
    """-std=... for both g++ and nvcc: the newer of what torch's headers require and what torch's
    cpp_extension builds extensions with by default.

    cpp_extension's default is C++20 from torch 2.13 on (pytorch#176659; it adds that -std only
    when an extension passes none, so a hard-coded c++17 used to override it). torch 2.13's
    headers already use C++20 features (designated initializers, bit-field member initializers)
    that g++ accepts in C++17 mode only as extensions, with warnings; torch 2.14's headers make
    C++20 a hard #error. Before 2.13, C++17 (its headers' #error minimum). g++ >= 10 and nvcc >= 12
    support c++20; our sources build with either standard.
    """
    default = 20 if _version_tuple(torch_version) >= (2, 13) else 17
    return f"c++{max(default, header_cxx_minimum(include_dirs))}"


def torch_requirement(torch_version):
    """The wheel's torch requirement: the major.minor it was built against.

    The extension links libtorch's C++ ABI, which changes between minor releases (an extension
    built for 2.13 fails to load with undefined symbols under 2.14), and patch releases keep it.
    `torch>=2.13,<2.14` is met by an installed 2.13.0+cpu or +cu130 (local labels do not count),
    so pip never fetches another torch where the one it was built with is installed. A
    pre-release torch (a nightly) gets a lower bound that admits pre-releases.
    """
    major, minor = _version_tuple(torch_version)
    public = str(torch_version).split("+")[0]
    prerelease = re.search(r"(a|b|rc|dev)\d*$", public) is not None
    low = f"{major}.{minor}.0.dev0" if prerelease else f"{major}.{minor}"
    return f"torch>={low},<{major}.{minor + 1}"


def debug_info_flags():
    """(compile, link) flags. Python's CFLAGS carry -g, which made _C.so ~32 MB, ~30 MB of it
    DWARF: drop it (-g0 also compiles faster) and strip any that the static CUDA runtime or the
    nvcc objects bring; symbols stay, for backtraces. MOE_COMM_DEBUG_INFO=1 keeps it all."""
    if os.environ.get("MOE_COMM_DEBUG_INFO", "0") == "1":
        return [], []
    return ["-g0"], ["-Wl,--strip-debug"]


def optimization_flag():
    """-O<n> for g++ and nvcc's host code: MOE_COMM_OPT_LEVEL (default 3). 0 compiles about 40%
    faster (tests/test_packaging.py builds a throwaway wheel with it)."""
    level = os.environ.get("MOE_COMM_OPT_LEVEL", "3")
    if level not in ("0", "1", "2", "3", "s"):
        raise SystemExit(f"MOE_COMM_OPT_LEVEL={level!r}: expected 0, 1, 2, 3 or s")
    return f"-O{level}"


def import_torch():
    try:
        import torch
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as exc:
        raise SystemExit(NO_TORCH_MESSAGE.format(error=exc)) from exc
    return torch


def main():
    torch = import_torch()
    from setuptools import find_packages, setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

    cuda_home = find_cuda_home()
    nccl_home = find_nccl_home() if cuda_home else None
    nccl_wheel = nccl_wheel_of(nccl_home) if nccl_home else None
    archs = cuda_archs() if cuda_home else []
    std = cxx_standard(torch.__version__, include_paths())
    compile_debug, link_debug = debug_info_flags()
    opt = optimization_flag()

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(CSRC, "bindings", "*.cpp")))
               + sorted(glob.glob(os.path.join(CSRC, "core", "*.cpp")))
               + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
               + sorted(glob.glob(os.path.join(CSRC, "engine", "*.cpp")))]
    define_macros = []
    include_dirs = [CSRC]
    libraries = []
    # numpy: torch does not require it, but torch.distributed's object collectives, which the
    # Buffer uses (all_gather_object of host names), fail without it ("Numpy is not available").
    install_requires = [torch_requirement(torch.__version__), "numpy"]
    if cuda_home:
        define_macros += [("MOE_COMM_WITH_CUDA", None),
                          ("MOE_COMM_CUDA_ARCHS", '"' + ";".join(f"sm_{a}" for a in archs) + '"')]
        include_dirs.append(os.path.join(cuda_home, "include"))
        libraries += ["dl", "rt", "pthread"]
    if nccl_home:
        define_macros.append(("MOE_COMM_WITH_NCCL", None))
        include_dirs.append(os.path.join(nccl_home, "include"))
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(CSRC, "comm", "*.cpp")))]
        if nccl_wheel:
            # No version bound: NCCL 2.x keeps its ABI, our calls exist in every cu12/cu13
            # wheel, and a bound would fight the exact NCCL pin of CUDA torch wheels.
            install_requires.append(nccl_wheel)

    class BuildWithNvcc(BuildExtension):
        """Compiles csrc/kernels/*.cu with nvcc first, then links the objects into the extension."""

        def build_extensions(self):
            in_place = bool(self.inplace or getattr(self, "editable_mode", False))
            _log(f"torch {torch.__version__}, python {sys.version.split()[0]}, -std={std}, "
                 f"{'in place (editable)' if in_place else 'regular (wheel)'} build")
            if cuda_home:
                objects = self._compile_cuda()
                cudart = os.path.join(cuda_home, "lib64", "libcudart_static.a")
                if not os.path.exists(cudart):
                    cudart = os.path.join(cuda_home, "lib", "libcudart_static.a")
                for ext in self.extensions:
                    ext.extra_objects = list(ext.extra_objects or []) + objects + [cudart]
                _log(f"CUDA: {cuda_home}, archs {', '.join('sm_' + a for a in archs)}, "
                     f"{len(objects)} kernel object(s), cudart static")
            else:
                _log("CUDA: nvcc not found (or MOE_COMM_WITH_CUDA=0): building the CPU part only")
            if nccl_home:
                link = nccl_link_args(nccl_home, nccl_wheel is not None, in_place)
                for ext in self.extensions:
                    ext.extra_link_args = list(ext.extra_link_args or []) + link
                _log(f"NCCL: {nccl_home} ({nccl_wheel or 'NCCL_HOME'}), "
                     f"rpath {', '.join(a.split(',', 2)[2] for a in link if '-rpath' in a)}")
            elif cuda_home:
                _log(f"NCCL: not found, building without NCCL (no multi-GPU transport). To get it: "
                     f"{NCCL_HINT}")
            super().build_extensions()

        def _compile_cuda(self):
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
            os.makedirs(out_dir, exist_ok=True)
            gencode = []
            for i, arch in enumerate(archs):
                codes = f"sm_{arch}" + (f",compute_{arch}" if i == len(archs) - 1 else "")
                gencode += ["-gencode", f"arch=compute_{arch},code=[{codes}]"]
            jobs = []
            for cu in sorted(glob.glob(os.path.join(CSRC, "kernels", "*.cu"))):
                obj = os.path.join(out_dir, os.path.basename(cu) + ".o")
                cmd = [nvcc, "-c", cu, "-o", obj, opt, f"-std={std}", "-Xcompiler", "-fPIC",
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
        install_requires=install_requires,
        ext_modules=[CppExtension(
            "moe_comm._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            libraries=libraries,
            extra_compile_args=[opt, f"-std={std}", *compile_debug],
            extra_link_args=link_debug,
        )],
        cmdclass={"build_ext": BuildWithNvcc},
    )


if __name__ == "__main__":
    main()
