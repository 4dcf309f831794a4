"""Packaging: how moe_comm builds, what its wheel declares and records, what its import says.

setup.py's helpers are tested directly (importing setup.py builds nothing), some in a Python that
truly lacks a package (a sys.path view of this environment's site-packages without it). The one
expensive test (marker `build`) builds a real CPU-only wheel (MOE_COMM_WITH_CUDA=0: no nvcc) from
a copy of the tree, checks its metadata and extension, installs it and runs a dispatch.
"""

import glob
import importlib.machinery
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch.utils.cpp_extension import include_paths

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.dirname(os.path.dirname(torch.__file__))  # the site-packages holding torch


def load_setup():
    spec = importlib.util.spec_from_file_location("moe_comm_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_without(tmp_path, hidden, code):
    """Runs `code` in a Python that sees this environment's site-packages except the entries
    starting with one of `hidden` (and no .pth files: python -S)."""
    view = tmp_path / "site-view"
    view.mkdir()
    for entry in os.listdir(SITE):
        if not entry.lower().startswith(hidden) and not entry.endswith(".pth"):
            os.symlink(os.path.join(SITE, entry), view / entry)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NCCL_HOME")}
    prelude = f"import sys; sys.path[:0] = [{str(view)!r}]\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def readelf(*args):
    return subprocess.run(["readelf", *args], capture_output=True, text=True, check=True).stdout


# ---- import moe_comm --------------------------------------------------------------------------

def test_submodules_are_attributes_after_import(tmp_path):
    code = """
        import sys
        import moe_comm
        assert not {"moe_comm.nn", "moe_comm.launch", "moe_comm.plan"} & set(sys.modules), "imported eagerly"
        assert moe_comm.nn.MoELayer and moe_comm.nn.allreduce_replicated_grads
        assert callable(moe_comm.launch.init_distributed)
        assert moe_comm.plan.Cluster and "plan" in dir(moe_comm)
        assert set(moe_comm.__all__) <= set(dir(moe_comm))
        try:
            moe_comm.no_such_thing
        except AttributeError as e:
            assert "no_such_thing" in str(e)
        else:
            raise AssertionError("no AttributeError")
        namespace = {}
        exec("from moe_comm import *", namespace)
        assert namespace["nn"] is moe_comm.nn and namespace["dispatch"] is moe_comm.dispatch
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---- setup.py helpers ---------------------------------------------------------------------------

def test_nccl_search_without_the_nvidia_package(tmp_path):
    """No `nvidia` package at all: find_nccl_home says None (it used to raise ModuleNotFoundError
    out of importlib.util.find_spec), so the build goes on without NCCL."""
    result = run_without(tmp_path, ("nvidia",), f"""
        import importlib.util
        try:
            importlib.util.find_spec("nvidia.nccl")
            raise SystemExit("nvidia is importable: the test environment is wrong")
        except ModuleNotFoundError:
            pass
        spec = importlib.util.spec_from_file_location("s", {os.path.join(ROOT, "setup.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.find_nccl_home() is None
        assert "pip install nvidia-nccl-cu13" in module.NCCL_HINT
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_nccl_wheel_is_found_and_named():
    setup_py = load_setup()
    home = setup_py.find_nccl_home()
    if home is None or os.environ.get("NCCL_HOME"):
        pytest.skip("no nvidia-nccl wheel in this environment")
    assert setup_py.nccl_wheel_of(home) in setup_py.NCCL_WHEELS


def test_isolated_build_stops_at_once_without_torch(tmp_path):
    """pip's isolated build environment has no torch (pyproject.toml does not ask for one):
    setup.py stops with the --no-build-isolation advice instead of downloading a torch."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    assert not any(Requirement(r).name == "torch" for r in requires), requires
    result = run_without(tmp_path, ("torch", "functorch"), f"""
        import runpy
        sys.argv = ["setup.py", "egg_info"]
        runpy.run_path({os.path.join(ROOT, "setup.py")!r}, run_name="__main__")
    """)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pip install --no-build-isolation ." in result.stderr
    assert "No module named 'torch'" in result.stderr


def test_cxx_standard_follows_torch(tmp_path):
    setup_py = load_setup()
    assert setup_py.cxx_standard(torch.__version__, include_paths()) == (
        "c++20" if setup_py._version_tuple(torch.__version__) >= (2, 13) else "c++17")
    assert setup_py.header_cxx_minimum(include_paths()) >= 17  # the check is found in torch's headers
    assert setup_py.cxx_standard("2.12.1+cu128", []) == "c++17"
    assert setup_py.cxx_standard("2.14.0", []) == "c++20"
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "ATen.h").write_text(
        "#if !defined(_MSC_VER) && __cplusplus < 202302L\n#error C++23 or later ... ATen.\n#endif\n")
    assert setup_py.cxx_standard("2.13.0", [str(tmp_path)]) == "c++23"


def test_torch_requirement_is_met_by_the_torch_it_was_built_with():
    setup_py = load_setup()
    requirement = Requirement(setup_py.torch_requirement(torch.__version__))
    assert requirement.name == "torch"
    assert requirement.specifier.contains(str(torch.__version__), prereleases=True)
    built_213 = Requirement(setup_py.torch_requirement("2.13.0+cpu")).specifier
    assert built_213.contains("2.13.0+cu130") and built_213.contains("2.13.1")
    assert not built_213.contains("2.14.0") and not built_213.contains("2.12.0")
    nightly = Requirement(setup_py.torch_requirement("2.14.0.dev20260801+cpu")).specifier
    assert nightly.contains("2.14.0.dev20260801+cpu", prereleases=True)


def test_nccl_rpath_is_relative_except_in_place():
    setup_py = load_setup()
    home = "/build/venv/lib/python3.11/site-packages/nvidia/nccl"

    def rpaths(args):
        return [a.split(",", 2)[2] for a in args if a.startswith("-Wl,-rpath,")]
    assert rpaths(setup_py.nccl_link_args(home, from_wheel=True, in_place=False)) == ["$ORIGIN/../nvidia/nccl/lib"]
    assert rpaths(setup_py.nccl_link_args(home, from_wheel=True, in_place=True)) == [
        "$ORIGIN/../nvidia/nccl/lib", home + "/lib"]
    assert rpaths(setup_py.nccl_link_args("/opt/nccl", from_wheel=False, in_place=False)) == ["/opt/nccl/lib"]


# ---- the import error for a missing libnccl.so.2 ----------------------------------------------------

def test_missing_libnccl_message():
    from moe_comm._native import load_error_message
    error = "libnccl.so.2: cannot open shared object file: No such file or directory"
    message = load_error_message(error, nccl_wheel="nvidia-nccl-cu13")
    assert "pip install nvidia-nccl-cu13" in message and error in message
    assert "Build it" not in message and "rebuild" not in message
    assert "pip install nvidia-nccl-cu12" in load_error_message(error, nccl_wheel="nvidia-nccl-cu12")
    other = load_error_message("_C.so: undefined symbol: _ZN3c104cuda")
    assert "--no-build-isolation" in other and "nccl" not in other.lower()


def test_missing_libnccl_on_a_real_import(tmp_path):
    """A real extension module that needs libnccl.so.2, which is not there: the loader's own
    error goes through _native.py's message."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "nccl.c").write_text("int ncclFake(void) { return 0; }\n")
    (src / "ext.c").write_text("int ncclFake(void);\nint uses(void) { return ncclFake(); }\n"
                               "void *PyInit__C(void) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libnccl.so.2", "-o", src / "libnccl.so.2",
                    src / "nccl.c"], check=True)
    package = tmp_path / "fake_moe_comm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(ROOT, "moe_comm", "_native.py"), package / "_native.py")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,--no-as-needed", "-o", package / f"_C{suffix}",
                    src / "ext.c", f"-L{src}", "-l:libnccl.so.2"], check=True)
    os.remove(src / "libnccl.so.2")
    result = subprocess.run([sys.executable, "-c", "import fake_moe_comm._native"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "libnccl.so.2: cannot open shared object file" in result.stderr, result.stderr
    assert re.search(r"pip install nvidia-nccl-cu1[23]", result.stderr), result.stderr


# ---- one real wheel -------------------------------------------------------------------------------

DISPATCH = """
import os, sys
import torch, torch.distributed as dist
import moe_comm
assert moe_comm.__file__.startswith(sys.argv[1]), moe_comm.__file__
dist.init_process_group("gloo")
buf = moe_comm.Buffer(num_experts=4)
x = torch.randn(8, 16)
weights, topk_idx = torch.rand(8, 4).softmax(-1).topk(2, dim=-1)
recv_x, recv_w, tokens_per_expert, handle = moe_comm.dispatch(x, topk_idx, weights, buf)
assert int(tokens_per_expert.sum()) == 16, tokens_per_expert
y = moe_comm.combine(recv_x, handle, weights)
torch.testing.assert_close(y, x * weights.sum(-1, keepdim=True))
print("build_info", moe_comm.build_info())
dist.destroy_process_group()
"""


@pytest.mark.build
def test_cpu_wheel_metadata_runpath_size_and_dispatch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info")
    for name in ("moe_comm", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_HOME", "PYTHONPATH")}
    env["MOE_COMM_WITH_CUDA"] = "0"  # no nvcc: minutes less; NCCL needs CUDA, so no NCCL either
    env["MOE_COMM_OPT_LEVEL"] = "0"  # parsing torch's headers dominates; -O3 would add ~40%
    dist_dir = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                            str(src), "-w", str(dist_dir)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    [wheel] = glob.glob(str(dist_dir / "moe_comm-*.whl"))

    # C++ standard: the one torch needs, nothing forced.
    [ninja_file] = glob.glob(str(src / "build" / "**" / "build.ninja"), recursive=True)
    with open(ninja_file) as f:
        ninja = f.read()
    std = load_setup().cxx_standard(torch.__version__, include_paths())
    assert f"-std={std}" in ninja and set(re.findall(r"-std=c\+\+\d+", ninja)) == {f"-std={std}"}

    # Requirements: this torch's major.minor, met by the installed torch; no NCCL in a CPU build.
    with zipfile.ZipFile(wheel) as zf:
        [metadata] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in zf.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        [so_name] = [n for n in zf.namelist() if n.startswith("moe_comm/_C") and n.endswith(".so")]
        zf.extract(so_name, tmp_path / "unzipped")
    [torch_req] = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains(str(torch.__version__), prereleases=True), requires
    assert not [r for r in requires if "nccl" in r], requires
    assert "numpy" in requires, requires  # torch.distributed's all_gather_object needs it

    # The extension: no absolute rpath (no build or venv path), no debug info, small.
    so = tmp_path / "unzipped" / so_name
    dynamic = readelf("-d", str(so))
    for paths in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic):
        assert all(p.startswith("$ORIGIN") for p in paths.split(":")), dynamic
    assert str(tmp_path) not in dynamic and SITE not in dynamic
    assert ".debug_info" not in readelf("-S", "-W", str(so))
    size = os.path.getsize(so)
    assert size < 8 * 2 ** 20, size
    print(f"_C.so: {size / 2 ** 20:.1f} MiB")

    # It installs (deps: already met) and works on CPU.
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(site), wheel], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_env = dict(env, PYTHONPATH=str(site), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK="0", WORLD_SIZE="1")
    run = subprocess.run([sys.executable, "-c", DISPATCH, str(site)], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "'cuda': False" in run.stdout
