"""Flat vs hierarchical vs node-limited routing on emulated clusters (bench/cluster.py) at
several inter-node rates, each beside the planner's prediction (python -m moe_comm.plan) for
the same links; prints a table and writes JSON and a plot of time against the link's rate.

    sudo .venv/bin/python bench/cluster_sweep.py --shapes 2x4,4x2 --rates 50mbit,100mbit,200mbit \\
        --out sweep          # -> sweep.json, sweep.png

Per shape it first runs every mode on unshaped links: what the cores cost without a slow
network (8 ranks on a small machine are CPU-bound), "fixed" below. Then per rate it measures
the link's achieved rate (a 2-second TCP stream between two nodes: what tc's token bucket lets
through after headers) and runs every mode. The planner gets that achieved rate as the NIC of
each node (--nic-per node: the harness shapes one link per node, shared by its ranks) and
predicts the busiest node's bytes and the link's time; "predicted" is fixed + that time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster as harness  # noqa: E402
from moe_comm import plan as planner  # noqa: E402

MODES = {  # name: (bench flags, the planner's scenario)
    "flat": (["--hierarchical", "off"], "flat"),
    "hierarchical": (["--hierarchical", "on"], "hierarchical"),
    "node-limited": (["--hierarchical", "on", "--max-nodes", "1"], "hierarchical+node-limited(1)"),
}
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_dispatch_combine.py")
RATE_PROBE_PORT = 29990

# Runs in a node's namespace: receives one TCP stream and prints its bytes per second.
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(30)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); c, _ = s.accept(); c.settimeout(30)
got, first = 0, None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if first is None: first = time.monotonic(); continue  # the token bucket's burst: not the rate
    got += len(b)
print(got / (time.monotonic() - first))
"""
# Runs in another node: sends for argv[3] seconds.
_SENDER = """
import socket, sys, time
for _ in range(100):
    try: c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); break
    except OSError: time.sleep(0.05)
end, block = time.monotonic() + float(sys.argv[3]), b"x" * (1 << 16)
while time.monotonic() < end: c.sendall(block)
c.close()
"""


def achieved_rate(cluster: harness.Cluster, seconds: float = 2.0) -> float:
    """Bytes per second one TCP stream gets from node 1 to node 0 (what the shaped link carries
    after the headers of each packet)."""
    addr = cluster.address(0)
    receiver = subprocess.Popen(["ip", "netns", "exec", cluster.node_ns(0), sys.executable, "-c", _RECEIVER, addr,
                                 str(RATE_PROBE_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        harness.run("ip", "netns", "exec", cluster.node_ns(1), sys.executable, "-c", _SENDER, addr,
                    str(RATE_PROBE_PORT), str(seconds))
        out, _ = receiver.communicate(timeout=30)
        return float(out.strip())
    finally:  # a receiver left in accept() would keep node 0's namespace alive after its teardown
        receiver.kill()
        receiver.wait()


LOG = [None]  # the file the ranks' output goes to (OUT.log)


def run_bench(cluster: harness.Cluster, per_node: int, flags: List[str], bench_args: List[str]) -> List[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        command = [sys.executable, BENCH, *bench_args, *flags, "--json", path]
        print(f"$ {' '.join(command)}", file=LOG[0], flush=True)
        codes = harness.launch(cluster, per_node, command, timeout=900, output=LOG[0])
        if any(codes):
            raise harness.ClusterError(f"the benchmark failed (exit codes by rank: {codes}; its output: "
                                       f"{LOG[0].name})")
        with open(path) as f:
            return json.load(f)


def _pick(records: List[dict], impl: str, op: str) -> dict:
    return next(r for r in records if r["impl"] == impl and r["op"] == op)


def measure(cluster, per_node, mode, bench_args) -> Dict[str, float]:
    records = run_bench(cluster, per_node, MODES[mode][0], bench_args)
    ours, theirs = (lambda op: _pick(records, "moe_comm", op)), (lambda op: _pick(records, "torch_baseline", op))
    shape = ours("dispatch")
    return dict(dispatch_ms=ours("dispatch")["median_us"] / 1e3, combine_ms=ours("combine")["median_us"] / 1e3,
                roundtrip_ms=ours("roundtrip")["median_us"] / 1e3,
                baseline_dispatch_ms=theirs("dispatch")["median_us"] / 1e3,
                baseline_combine_ms=theirs("combine")["median_us"] / 1e3,
                inter_bytes=shape["bytes_wire_inter"], intra_bytes=shape["bytes_wire_intra"],
                tokens=shape["tokens"], hidden=shape["hidden"], experts=shape["experts"], topk=shape["topk"],
                dtype=shape["dtype"], wire_dtype=shape.get("wire_dtype", "native"))


def predict(nodes, per_node, rate, m) -> Dict[str, Dict[str, float]]:
    """The planner on this cluster: a NIC per node at the achieved rate; NVLink (here shared
    memory) taken as free, its cost being in the measured fixed part. -> per scenario: the
    busiest node's wire bytes and the link's milliseconds."""
    model = planner.Cluster(nodes, per_node, nvlink_gbytes_per_s=1e9, nic_gbytes_per_s=rate / 1e9,
                            nvlink_latency_us=0.0, nic_latency_us=0.0, nic_per_node=True)
    out, elem, wire = {}, ELEM_BYTES[m["dtype"]], m["wire_dtype"]
    row = planner.wire_row_bytes(m["hidden"], elem, m["topk"], wire)
    for p in planner.plan(model, m["tokens"], m["hidden"], m["experts"], m["topk"], elem, 1, wire_dtype=wire):
        rows_per_node = p.nic_wire_bytes / row.dispatch_wire
        out[p.scenario] = dict(link_dispatch_ms=p.dispatch_us / 1e3, link_combine_ms=p.combine_us / 1e3,
                               node_wire_bytes=p.nic_wire_bytes,
                               predicted_inter_bytes=rows_per_node * row.dispatch * nodes)
    return out


def sweep_shape(nodes: int, per_node: int, rates: List[str], modes: List[str], bench_args: List[str],
                loss: str = None) -> List[dict]:
    rows = []
    with harness.Cluster(nodes, loss=loss) as cluster:
        fixed = {mode: measure(cluster, per_node, mode, bench_args) for mode in modes}  # unshaped links
        for mode, m in fixed.items():
            rows.append(dict(shape=f"{nodes}x{per_node}", rate="unshaped", achieved_Bps=None, mode=mode, **m))
            print(f"{nodes}x{per_node} unshaped {mode:<13} dispatch {m['dispatch_ms']:8.1f} ms  combine "
                  f"{m['combine_ms']:8.1f} ms", flush=True)
        for rate in rates:
            for n in range(nodes):
                cluster.shape(n, rate=rate)
            achieved = achieved_rate(cluster)
            for mode in modes:
                m = measure(cluster, per_node, mode, bench_args)
                p = predict(nodes, per_node, achieved, m)[MODES[mode][1]]
                row = dict(shape=f"{nodes}x{per_node}", rate=rate, achieved_Bps=achieved, mode=mode, **m, **p)
                row["predicted_dispatch_ms"] = fixed[mode]["dispatch_ms"] + p["link_dispatch_ms"]
                row["predicted_combine_ms"] = fixed[mode]["combine_ms"] + p["link_combine_ms"]
                rows.append(row)
                print(f"{nodes}x{per_node} {rate:>8} ({achieved / 1e6:5.2f} MB/s) {mode:<13} dispatch "
                      f"{m['dispatch_ms']:8.1f} ms (predicted {row['predicted_dispatch_ms']:7.1f})  combine "
                      f"{m['combine_ms']:8.1f} ms (predicted {row['predicted_combine_ms']:7.1f})  inter bytes "
                      f"{m['inter_bytes'] / 1e6:6.2f} MB (predicted {p['predicted_inter_bytes'] / 1e6:6.2f})", flush=True)
    return rows


def print_summary(rows: List[dict]) -> None:
    print("\nshape  rate      mode           dispatch ms  pred   err   combine ms  pred   err   "
          "vs flat (d/c)   inter MB  pred  vs baseline (d)")
    for r in rows:
        if r["rate"] == "unshaped":
            continue
        flat = next((f for f in rows if f["shape"] == r["shape"] and f["rate"] == r["rate"] and f["mode"] == "flat"),
                    r)  # without a flat run the column reads 1.00x
        err = lambda a, b: f"{100 * (b / a - 1):+4.0f}%"  # noqa: E731
        print(f"{r['shape']:<6} {r['rate']:<9} {r['mode']:<13} {r['dispatch_ms']:10.1f} {r['predicted_dispatch_ms']:6.1f} "
              f"{err(r['dispatch_ms'], r['predicted_dispatch_ms'])} {r['combine_ms']:10.1f} "
              f"{r['predicted_combine_ms']:6.1f} {err(r['combine_ms'], r['predicted_combine_ms'])}   "
              f"{flat['dispatch_ms'] / r['dispatch_ms']:5.2f}x/{flat['combine_ms'] / r['combine_ms']:4.2f}x  "
              f"{r['inter_bytes'] / 1e6:8.2f} {r['predicted_inter_bytes'] / 1e6:5.2f}"
              f"  {r['baseline_dispatch_ms'] / r['dispatch_ms']:5.2f}x")
    errors = [abs(r[f"predicted_{op}_ms"] / r[f"{op}_ms"] - 1) for r in rows if r["rate"] != "unshaped"
              for op in ("dispatch", "combine")]
    if errors:
        print(f"planner error: median {100 * statistics.median(errors):.0f}%, worst {100 * max(errors):.0f}%")


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7.5), squeeze=False)
    colors = {"flat": "tab:red", "hierarchical": "tab:blue", "node-limited": "tab:green"}
    for col, shape in enumerate(shapes):
        for row_i, op in enumerate(("dispatch", "combine")):
            ax = axes[row_i][col]
            for mode, color in colors.items():
                pts = sorted((r for r in rows if r["shape"] == shape and r["mode"] == mode and r["achieved_Bps"]),
                             key=lambda r: r["achieved_Bps"])
                if not pts:
                    continue
                rate = [r["achieved_Bps"] * 8 / 1e6 for r in pts]
                ax.plot(rate, [r[f"{op}_ms"] for r in pts], "-o", color=color, label=f"{mode} measured")
                ax.plot(rate, [r[f"predicted_{op}_ms"] for r in pts], "x--", color=color, label=f"{mode} planner")
            ax.set(xscale="log", yscale="log", xlabel="inter-node link, achieved Mbit/s", ylabel=f"{op} ms (median)",
                   title=f"{shape} (nodes x ranks): {op}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2x4,4x2", help="NODESxRANKS,... ")
    p.add_argument("--rates", default="50mbit,100mbit,200mbit", help="tc rates of the inter-node links")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--loss", help="packet loss on every link, e.g. 0.5%% (bench/cluster.py --loss), unshaped runs too")
    p.add_argument("--out", default="cluster_sweep", help="writes OUT.json, OUT.png and OUT.log (the ranks' output)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="-- then bench_dispatch_combine.py's flags (default: tiny preset in bf16, top-8 of 64 "
                        "experts, 8 iterations)")
    args = p.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"] or [
        "--preset", "tiny", "--dtype", "bfloat16", "--experts", "64", "--topk", "8", "--iters", "8", "--warmup", "2"]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {list(MODES)}")
    LOG[0] = open(args.out + ".log", "w")
    try:
        harness.preflight()
        rows = []
        for shape in args.shapes.split(","):
            nodes, per_node = (int(v) for v in shape.split("x"))
            rows += sweep_shape(nodes, per_node, args.rates.split(","), modes, bench_args, args.loss)
    except harness.ClusterError as exc:
        print(f"bench/cluster_sweep.py: {exc}", file=sys.stderr)
        return 2
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print_summary(rows)
    plot(rows, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
