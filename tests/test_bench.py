"""The benchmark runs under torchrun at a small size and reports every record; its help, memory
check and byte counts."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import moe_comm
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import baseline  # noqa: E402
import bench_dispatch_combine as bench  # noqa: E402


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
    assert "[bench] memory estimate at 33 tokens/rank" in proc.stdout
    assert "[bench] tokens 33: torch_baseline roundtrip ... " in proc.stdout  # progress, as it goes
    records = json.loads(out.read_text())
    assert sorted((r["tokens"], r["impl"], r["op"]) for r in records) == sorted(
        (t, impl, op) for t in (0, 33) for impl in ("moe_comm", "torch_baseline")
        for op in ("dispatch", "combine", "roundtrip"))
    for r in records:
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["world_size"] == 2 and r["speedup_vs_baseline"] > 0
        assert r["bytes_wire_inter"] == r["bytes_logical_inter"] == 0  # one node
        assert (r["bytes_logical_intra"] > 0) == (r["tokens"] > 0)
        if r["impl"] == "moe_comm":  # a rank's rows to itself are logical bytes, not wire bytes
            assert r["bytes_wire_intra"] <= r["bytes_logical_intra"]
        for key in ("gbps_wire", "gbps_wire_intra", "gbps_wire_inter", "gbps_logical"):
            assert (r[key] is None) == (r["op"] == "roundtrip")
        run = r["run"]
        assert run["moe_comm_version"] == moe_comm.__version__ and run["torch_version"] == torch.__version__
        assert run["build_info"] == moe_comm.build_info() and run["world_size"] == 2
        assert run["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", run["git_commit"])
        assert run["hostname"] and run["python_version"] and "--sweep-tokens 0,33" in run["command"]
        assert run["date_utc"].endswith("+00:00")
        assert r["peak_rss_bytes_max_rank"] > 0 and r["memory_estimate_bytes_per_rank"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_with_fp8_dispatch_rows(tmp_path):
    """--wire-dtype fp8: moe_comm's dispatch rows cross as H + 4 ceil(H / 128) bytes, its combine
    rows and the baseline's stay in --dtype (float32 here: 4 H bytes)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "bench", "bench_dispatch_combine.py"), "--tokens", "33", "--hidden", "24",
           "--experts", "4", "--topk", "2", "--warmup", "1", "--iters", "2", "--wire-dtype", "fp8",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(dispatch rows in FP8)" in proc.stdout and "on-wire, moe_comm combine" in proc.stdout
    at = {(r["impl"], r["op"]): r for r in json.loads(out.read_text())}
    ours_d, ours_c = at[("moe_comm", "dispatch")], at[("moe_comm", "combine")]
    assert ours_d["wire_dtype"] == "fp8" and at[("torch_baseline", "dispatch")]["wire_dtype"] == "native"
    assert ours_d["bytes_wire_intra"] > 0 and ours_d["bytes_wire_intra"] * 96 == ours_c["bytes_wire_intra"] * 28
    assert ours_d["bytes_logical_intra"] == ours_c["bytes_logical_intra"]


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
    assert [r["kernel"] for r in records] == ["copy", "pack", "pack_fp8", "expand", "reduce"]
    for r in records:
        assert r["median_us"] > 0 and r["gbps"] > 0 and r["fraction_of_copy"] > 0
    assert "of copy" in proc.stdout


def test_help_shows_defaults_and_presets_once(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 30)" in out and "(default: tiny)" in out and "(default: None)" not in out
    assert re.search(r"deepseek-v3\s+4096\s+7168\s+256\s+8\s+bfloat16\s+4\s+[\d.]+ GiB", out), out
    monkeypatch.setenv("RANK", "3")  # under torchrun: the other ranks exit without a word
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert capsys.readouterr().out == ""


def _args(*argv):
    return bench.parse_args(["--device", "cpu", *argv])


def test_memory_check_refuses_what_does_not_fit_and_says_how_to_shrink(monkeypatch, capsys):
    for name, value in (("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bench, "available_host_bytes", lambda: 20 * bench.GiB)
    with pytest.raises(SystemExit) as exit_:
        bench.check_memory(_args("--preset", "deepseek-v3"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "not enough memory" in err and "20.0 GiB" in err, err
    fit = int(re.search(r"--tokens (\d+) or fewer fits", err).group(1))
    assert 0 < fit < 4096
    assert 4 * bench.check_memory(_args("--preset", "deepseek-v3", "--tokens", str(fit))) <= 20 * bench.GiB
    assert bench.check_memory(_args("--preset", "deepseek-v3", "--no-memory-check")) > 0
    monkeypatch.setenv("RANK", "2")  # every rank exits; only rank 0 explains
    with pytest.raises(SystemExit) as exit_:
        bench.check_memory(_args("--preset", "deepseek-v3", "--sweep-tokens", f"64,{fit + 64}"))
    assert exit_.value.code == 1 and capsys.readouterr().err == ""


def test_memory_estimate_counts_what_the_deepseek_preset_holds():
    # 4 CPU ranks at DeepSeek-V3's shape: beyond the 24 GiB box that was OOM-killed.
    shape = bench.PRESETS["deepseek-v3"]
    per_rank = bench.estimate_rank_bytes(shape["tokens"], shape["hidden"], 2, shape["topk"], 4, 1, on_cuda=False)
    assert 4 * per_rank > 24 * bench.GiB
    two_stages = bench.estimate_rank_bytes(shape["tokens"], shape["hidden"], 2, shape["topk"], 4, 2, on_cuda=False)
    assert two_stages > per_rank


LAYOUTS = [("flat 1x4", 4, False), ("flat 2x2", 2, False), ("hierarchical 2x2", 2, True)]


def _bytes_worker(rank, world_size):
    args = argparse.Namespace(tokens=45, hidden=6, experts=8, topk=3, dtype="float32", skew=0.5, max_nodes=None)
    out = {}
    for name, ranks_per_node, hierarchical in LAYOUTS:
        buf = moe_comm.Buffer(num_experts=args.experts, ranks_per_node=ranks_per_node, hierarchical=hierarchical)
        x, idx, weights = bench.make_routing(args, rank, buf.topology.num_nodes, buf.device)
        row_bytes = args.hidden * x.element_size()
        stats = moe_comm.dispatch(x, idx, weights, buf)[3].stats
        pairs_off_rank = int((idx // buf.experts_per_rank != rank).sum())
        out[name] = dict(
            wire=bench.moe_comm_wire_bytes(idx, buf, row_bytes), logical=bench.logical_bytes(idx, buf, row_bytes),
            baseline=bench.baseline_wire_bytes(baseline.dispatch(x, idx, weights, args.experts)[3], buf, row_bytes),
            stats=(stats["bytes_sent_intra_node"], stats["bytes_sent_inter_node"]),
            pairs_off_rank=pairs_off_rank * row_bytes, hierarchical=buf.hierarchical,
            rows_to_self=int((idx // buf.experts_per_rank == rank).any(dim=1).sum()) * row_bytes)
    return out


def test_wire_bytes_equal_handle_stats_summed_over_ranks():
    per_rank = run_distributed(4, _bytes_worker)
    for name, _, hierarchical in LAYOUTS:
        got = [r[name] for r in per_rank]
        total = lambda key: tuple(sum(r[key][i] for r in got) for i in range(2))  # noqa: E731
        assert got[0]["hierarchical"] == hierarchical
        assert got[0]["wire"] == total("stats"), name  # every rank reports the sum over ranks
        assert sum(got[0]["baseline"]) == sum(r["pairs_off_rank"] for r in got), name
        if name == "flat 1x4":  # logical = wire + each rank's rows to itself
            assert got[0]["logical"][0] == got[0]["wire"][0] + sum(r["rows_to_self"] for r in got)
        if hierarchical:  # one network row per (token, destination node): DeepEP's RDMA bytes
            assert got[0]["wire"][1] == got[0]["logical"][1] > 0
        elif name == "flat 2x2":  # flat: one network row per (token, destination rank)
            assert got[0]["wire"][1] > got[0]["logical"][1] > 0
