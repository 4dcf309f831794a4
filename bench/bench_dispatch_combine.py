"""Times moe_comm dispatch / combine / forward+backward against the torch-native baseline on
the same routing in the same run. Launch with torchrun:

    torchrun --standalone --nproc-per-node 4 bench/bench_dispatch_combine.py --preset tiny

CUDA tensors over NCCL when a GPU is there (one per rank, LOCAL_RANK), else CPU tensors over
gloo; --device forces one. Bytes and every column are defined in bench/README.md.
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
from presets import PRESETS  # noqa: E402
from timing import sample_seconds  # noqa: E402

import moe_comm  # noqa: E402
from moe_comm.launch import init_distributed  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, help="tokens per rank")
    p.add_argument("--hidden", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--skew", type=float, default=0.0, help="0 = uniform routing; larger = hotter low experts")
    p.add_argument("--max-nodes", type=int, help="node-limited routing: each token's experts on at most this many nodes")
    p.add_argument("--ranks-per-node", type=int, help="simulate nodes of this many ranks (default: torchrun's)")
    p.add_argument("--hierarchical", choices=["auto", "on", "off"], default="auto",
                   help="two-stage forwarding through one rank per node (auto: when there are several nodes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda (NCCL) when torch sees a GPU, else cpu (gloo)")
    p.add_argument("--no-combine-status", action="store_true",
                   help="Buffer(combine_status=False): no ok/error exchange before each combine")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sweep-tokens", metavar="N,N,...", help="measure at each of these tokens per rank")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="PNG of latency and bandwidth against tokens per rank")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def make_routing(args, rank, num_nodes, device):
    gen = torch.Generator().manual_seed(1234 + rank)
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    if args.skew:
        logits = logits - args.skew * torch.linspace(0, 1, args.experts)
    max_nodes = min(args.max_nodes or num_nodes, num_nodes)
    idx, weights = moe_comm.node_limited_topk(logits, args.topk, num_nodes, max_nodes, score_func="softmax")
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(DTYPES[args.dtype])
    return x.to(device), idx.to(device), weights.to(device)


def timed(fn, args, group, device):
    """Runs fn warmup + iters times with a barrier before each sample (on CUDA: then an idle
    device, and CUDA events around fn). -> per-iteration seconds, the slowest rank's time for
    each iteration."""
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.iters):
        dist.barrier(group)
        samples.append(sample_seconds(fn, device))
    t = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def link_bytes(idx, buf, hidden, elem_size):
    """DeepEP's definitions, summed over ranks: intra = token rows received from the same node
    (one per (token, rank)), inter = distinct (token, destination node) pairs off the node."""
    topo = buf.topology
    idx = idx.cpu()
    dest_rank = (idx // buf.experts_per_rank).masked_fill(idx < 0, -1)
    intra = inter = 0
    for row in dest_rank.tolist():
        ranks = {d for d in row if d >= 0}
        intra += sum(1 for d in ranks if topo.node_of(d) == topo.node)
        inter += len({topo.node_of(d) for d in ranks} - {topo.node})
    t = torch.tensor([intra, inter], dtype=torch.int64, device=buf.device)
    dist.all_reduce(t, group=buf.group)
    return int(t[0]) * hidden * elem_size, int(t[1]) * hidden * elem_size


def measure(args, buf, world):
    """Checks moe_comm against the baseline, then times both. -> records (one per impl x op)."""
    x, idx, weights = make_routing(args, buf.rank, buf.topology.num_nodes, buf.device)

    # Same results first: the baseline is only a baseline if it computes the same thing.
    ours = moe_comm.dispatch(x, idx, weights, buf)
    theirs = baseline.dispatch(x, idx, weights, args.experts)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), "baseline disagrees"
    y_ours = moe_comm.combine(ours[0], ours[3], weights)
    y_theirs = baseline.combine(theirs[0], theirs[3])
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2e-2, atol=2e-2)

    def ours_roundtrip():
        xg = x.detach().requires_grad_()
        recv_x, recv_w, counts, handle = moe_comm.dispatch(xg, idx, weights, buf)
        moe_comm.combine(recv_x * 2, handle, weights).float().sum().backward()

    def theirs_roundtrip():
        xg = x.detach().requires_grad_()
        recv_x, recv_w, counts, handle = baseline.dispatch(xg, idx, weights, args.experts, differentiable=True)
        baseline.combine(recv_x * 2, handle, differentiable=True).float().sum().backward()

    ops = {
        "moe_comm": {
            "dispatch": lambda: moe_comm.dispatch(x, idx, weights, buf),
            "combine": lambda: moe_comm.combine(ours[0], ours[3], weights),
            "roundtrip": ours_roundtrip,
        },
        "torch_baseline": {
            "dispatch": lambda: baseline.dispatch(x, idx, weights, args.experts),
            "combine": lambda: baseline.combine(theirs[0], theirs[3]),
            "roundtrip": theirs_roundtrip,
        },
    }
    intra, inter = link_bytes(idx, buf, args.hidden, x.element_size())
    records = []
    for impl, by_op in ops.items():
        for op, fn in by_op.items():
            s = sorted(timed(fn, args, buf.group, buf.device))
            median = statistics.median(s)
            records.append(dict(
                impl=impl, op=op, median_us=median * 1e6, p10_us=s[len(s) // 10] * 1e6,
                p90_us=s[min(len(s) - 1, (9 * len(s)) // 10)] * 1e6, bytes_intra=intra, bytes_inter=inter,
                gbps_intra=intra / world / median / 1e9 if op != "roundtrip" else None,
                gbps_inter=inter / world / median / 1e9 if op != "roundtrip" else None,
                world_size=world, preset=args.preset, tokens=args.tokens, hidden=args.hidden,
                experts=args.experts, topk=args.topk, dtype=args.dtype, backend=buf.backend, device=buf.device.type,
                nodes=buf.topology.num_nodes, ranks_per_node=buf.topology.ranks_per_node,
                hierarchical=buf.hierarchical, max_nodes=args.max_nodes))
    base = {r["op"]: r["median_us"] for r in records if r["impl"] == "torch_baseline"}
    for r in records:
        r["speedup_vs_baseline"] = base[r["op"]] / r["median_us"]
    return records


def report(args, buf, world, records):
    """Prints a table per token count on rank 0 and writes --json."""
    if buf.rank != 0:
        return
    topo = buf.topology
    print(f"moe_comm {moe_comm.__version__} | {args.preset}: {world} ranks, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, {args.dtype}, {buf.backend}/{buf.device}, "
          f"{topo.num_nodes}x{topo.ranks_per_node} nodes x ranks{', hierarchical' if buf.hierarchical else ''}"
          f"{f', max {args.max_nodes} nodes/token' if args.max_nodes else ''}"
          f"{', no combine status' if args.no_combine_status else ''}, "
          f"{args.iters} iters (slowest rank per iter)")
    print(f"{'tokens':>6} {'op':<10} {'impl':<15} {'median us':>11} {'p10 us':>10} {'p90 us':>10} "
          f"{'intra GB/s':>10} {'inter GB/s':>10} {'speed-up':>9}")
    order = ["dispatch", "combine", "roundtrip"]
    for r in sorted(records, key=lambda r: (r["tokens"], order.index(r["op"]), r["impl"])):
        gbps = f"{r['gbps_intra']:.3f}" if r["gbps_intra"] is not None else "-"
        gbps_inter = f"{r['gbps_inter']:.3f}" if r["gbps_inter"] is not None else "-"
        print(f"{r['tokens']:>6} {r['op']:<10} {r['impl']:<15} {r['median_us']:>11.1f} {r['p10_us']:>10.1f} "
              f"{r['p90_us']:>10.1f} {gbps:>10} {gbps_inter:>10} {r['speedup_vs_baseline']:>8.2f}x")
    for tokens in sorted({r["tokens"] for r in records}):
        r = next(r for r in records if r["tokens"] == tokens)
        print(f"bytes per dispatch at {tokens} tokens/rank, all ranks: intra-node {r['bytes_intra']}, "
              f"inter-node {r['bytes_inter']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {world}")
    hierarchical = {"auto": "auto", "on": True, "off": False}[args.hierarchical]
    buf = moe_comm.Buffer(num_experts=args.experts, ranks_per_node=args.ranks_per_node, hierarchical=hierarchical,
                          combine_status=not args.no_combine_status)
    token_counts = [int(t) for t in args.sweep_tokens.split(",")] if args.sweep_tokens else [args.tokens]
    records = []
    for tokens in token_counts:
        args.tokens = tokens
        records += measure(args, buf, world)
    report(args, buf, world, records)
    if rank == 0 and args.plot:
        from plot import plot_records
        plot_records(records, args.plot)
        print(f"wrote {args.plot}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # torch 2.13's gloo can abort during interpreter teardown; all work is done and flushed.
    os._exit(0)


if __name__ == "__main__":
    main()
