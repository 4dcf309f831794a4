"""A script that builds a Buffer, dispatches, combines, destroys the process group and exits
normally must exit with 0 every time (it used to abort at interpreter exit in about half the
runs: gloo groups the Buffer kept alive were destroyed during interpreter teardown)."""

import os
import subprocess
import sys
import tempfile

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_script.py")
RUNS = {"flat": 10, "hierarchical": 2}  # the hierarchical Buffer adds two groups per rank


def _run_once(world: int, hierarchical: bool):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        extra = ["hierarchical"] if hierarchical else []
        procs = [subprocess.Popen([sys.executable, SCRIPT, str(r), str(world), init_file, *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(world)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_script_exits_cleanly_every_time(mode):
    failures = []
    for run in range(RUNS[mode]):
        for rank, (code, out) in enumerate(_run_once(2, mode == "hierarchical")):
            if code != 0 or f"rank {rank} done" not in out:
                failures.append(f"run {run} rank {rank}: exit code {code}\n{out[-2000:]}")
    assert not failures, f"{len(failures)} of {2 * RUNS[mode]} processes failed:\n" + "\n".join(failures[:3])
