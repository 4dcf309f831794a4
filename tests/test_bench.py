"""The benchmark runs under torchrun at a small size and reports every record."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_and_reports(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "bench", "bench_dispatch_combine.py"), "--sweep-tokens", "0,33", "--hidden", "24",
           "--experts", "4", "--topk", "2", "--warmup", "1", "--iters", "3", "--json", str(out),
           "--plot", str(png)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up" in proc.stdout and "dispatch" in proc.stdout
    records = json.loads(out.read_text())
    assert sorted((r["tokens"], r["impl"], r["op"]) for r in records) == sorted(
        (t, impl, op) for t in (0, 33) for impl in ("moe_comm", "torch_baseline")
        for op in ("dispatch", "combine", "roundtrip"))
    for r in records:
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["world_size"] == 2 and r["bytes_inter"] == 0 and r["speedup_vs_baseline"] > 0
        assert (r["bytes_intra"] > 0) == (r["tokens"] > 0)
        assert (r["gbps_inter"] is None) == (r["op"] == "roundtrip")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_example_runs_and_learns(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_tiny_moe.py"), "--steps", "25", "--tokens", "64",
           "--log-every", "24", "--ranks-per-node", "1", "--max-nodes", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    assert "2x1, hierarchical" in proc.stdout


def test_kernel_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--device", "cpu", "--tokens", "64",
           "--hidden", "40", "--experts", "16", "--topk", "4", "--ranks", "4", "--warmup", "1", "--iters", "3",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["kernel"] for r in records] == ["copy", "pack", "expand", "reduce"]
    for r in records:
        assert r["median_us"] > 0 and r["gbps"] > 0 and r["fraction_of_copy"] > 0
    assert "of copy" in proc.stdout
