"""Times moe_comm dispatch / combine / forward+backward against the torch-native baseline on
the same routing in the same run. Launch with torchrun (or scripts/bench.sh):

    torchrun --standalone --nproc-per-node 4 bench/bench_dispatch_combine.py --preset tiny

CUDA tensors over NCCL when a GPU is there (one per rank, LOCAL_RANK), else CPU tensors over
gloo; --device forces one. Before allocating anything it estimates the memory the run needs
and refuses a run that does not fit. Bytes, GB/s and every column are defined in
bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
from presets import PRESETS  # noqa: E402
from timing import sample_seconds  # noqa: E402

import moe_comm  # noqa: E402
from moe_comm import reference  # noqa: E402
from moe_comm.launch import init_distributed  # noqa: E402
from moe_comm.plan import dispatch_row_bytes as plan_row_bytes, link_rows, wire_row_bytes  # noqa: E402
from moe_comm.validation import expert_capacity  # noqa: E402

C = moe_comm.C

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
OPS = ["dispatch", "combine", "roundtrip"]


# ---- command line ------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except where there is none (None: the preset decides) or for on/off
    flags (off by default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class RankZeroParser(argparse.ArgumentParser):
    """Under torchrun every rank parses the same argv: only rank 0 prints help and usage errors
    (every rank still exits)."""

    def _print_message(self, message, file=None):
        if os.environ.get("RANK", "0") == "0":
            super()._print_message(message, file)


def presets_epilog() -> str:
    keys = ["tokens", "hidden", "experts", "topk", "dtype", "max_nodes"]
    lines = ["presets (--tokens, --hidden, --experts, --topk, --dtype, --max-nodes override them;",
             "memory: this script's estimate for 4 CPU ranks on one host, see bench/README.md):",
             f"  {'preset':<13}" + "".join(f"{k:>10}" for k in keys) + f"{'memory':>11}"]
    for name, shape in sorted(PRESETS.items()):
        values = "".join(f"{str(shape.get(k, '-')):>10}" for k in keys)
        need = 4 * estimate_rank_bytes(shape["tokens"], shape["hidden"], DTYPES[shape["dtype"]].itemsize,
                                       shape["topk"], 4, stages=1, on_cuda=False)
        lines.append(f"  {name:<13}{values}{need / GiB:>8.1f} GiB")
    return "\n".join(lines)


def parse_args(argv=None):
    p = RankZeroParser(description=__doc__, epilog=presets_epilog(), formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (table below)")
    p.add_argument("--tokens", type=int, help="tokens per rank (default: the preset's)")
    p.add_argument("--hidden", type=int, help="default: the preset's")
    p.add_argument("--experts", type=int, help="default: the preset's")
    p.add_argument("--topk", type=int, help="default: the preset's")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's")
    p.add_argument("--skew", type=float, default=0.0, help="0 = uniform routing; larger = hotter low experts")
    p.add_argument("--max-nodes", type=int,
                   help="node-limited routing: each token's experts on at most this many nodes (default: the "
                        "preset's, else unlimited)")
    p.add_argument("--ranks-per-node", type=int, help="simulate nodes of this many ranks (default: torchrun's)")
    p.add_argument("--hierarchical", choices=["auto", "on", "off"], default="auto",
                   help="two-stage forwarding through one rank per node (auto: when there are several nodes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda (NCCL) when torch sees a GPU, else cpu (gloo)")
    p.add_argument("--no-combine-status", action="store_true",
                   help="Buffer(combine_status=False): no ok/error status with each combine (in-band "
                        "on CPU, a host all-reduce first on CUDA)")
    p.add_argument("--cpu-transport", choices=["auto", "shm", "gloo"], default="auto",
                   help="Buffer(cpu_transport=...): how CPU ranks exchange rows (shm: shared memory of one host)")
    p.add_argument("--capacity-factor", type=float,
                   help="expert capacity: each expert keeps at most ceil(f * T * K / E) of a rank's pairs")
    p.add_argument("--drop-policy", choices=["probs", "position"], default="probs",
                   help="which pairs an expert keeps past its capacity (with --capacity-factor)")
    p.add_argument("--expert-alignment", type=int, default=1,
                   help="pad each local expert's rows with zero rows to a multiple of this")
    p.add_argument("--pad-to-capacity", action="store_true",
                   help="every (expert, source rank) block padded to the capacity (needs --capacity-factor)")
    p.add_argument("--static", action="store_true",
                   help="Buffer(max_tokens_per_rank=the largest --tokens): with --pad-to-capacity on a flat Buffer, "
                        "the static mode (fixed-size exchanges, no host wait; README: Static mode)")
    p.add_argument("--wire-dtype", choices=["native", "fp8"], default="native",
                   help="fp8: dispatch rows cross as e4m3 with a float32 scale per 128 elements "
                        "(wire_dtype=torch.float8_e4m3fn); combine and the baseline stay in --dtype")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per op")
    p.add_argument("--iters", type=int, default=30, help="timed calls per op")
    p.add_argument("--sweep-tokens", metavar="N,N,...", help="measure at each of these tokens per rank")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the memory estimate says the run does not fit")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="PNG of latency and bandwidth against tokens per rank")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def token_counts(args):
    return [int(t) for t in args.sweep_tokens.split(",")] if args.sweep_tokens else [args.tokens]


# ---- memory estimate (the model is described in bench/README.md) --------------------------

# Host memory of one rank besides its tensors: interpreter, torch, gloo (peak RSS ~0.4 GiB at
# the tiny preset on torch 2.13 CPU), rounded up.
PROCESS_BYTES = GiB // 2
# CUDA context, NCCL buffers and the caching allocator's slack on each GPU.
DEVICE_SLACK_BYTES = 2 * GiB
# Buffer workspaces kept per stage (each a send and a recv buffer, 25% headroom): dispatch,
# combine, combine's backward, dispatch's backward.
WORKSPACE_KINDS = 4
WORKSPACE_HEADROOM = 1.25


def estimate_rank_bytes(tokens: int, hidden: int, elem: int, topk: int, world: int, stages: int,
                        on_cuda: bool) -> int:
    """Bytes one rank needs at its peak, for balanced routing (the host total holds for any
    routing: what one rank receives more, another receives less)."""
    row, f32_row = hidden * elem, hidden * 4
    token_rows = tokens * min(topk, world)  # at most one row per (token, destination rank)
    pairs = tokens * topk                   # expanded rows: one per (token, expert)
    wire_row = wire_row_bytes(hidden, elem, topk).dispatch_wire
    workspaces = WORKSPACE_KINDS * stages * 2 * token_rows * wire_row * WORKSPACE_HEADROOM
    held = 3 * tokens * row + 2 * pairs * row  # x, both combines' y, both dispatches' recv_x
    # The largest transient: the baseline's roundtrip (per-pair copies of x, received and
    # re-ordered rows, the float32 weighted rows and their gradients).
    baseline_roundtrip = 8 * pairs * row + 3 * pairs * f32_row
    fixed = DEVICE_SLACK_BYTES if on_cuda else PROCESS_BYTES
    return int(fixed + workspaces + held + baseline_roundtrip)


def available_host_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # not Linux: nothing to compare with


def wants_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def planned_stages(args, world: int, local_world: int) -> int:
    ranks_per_node = args.ranks_per_node or local_world
    multi_node = world > ranks_per_node
    return 2 if multi_node and args.hierarchical != "off" else 1


def available_memory(on_cuda: bool):
    """-> (bytes or None when unknown, where they are)."""
    if on_cuda:
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0], "free on this GPU"
    return available_host_bytes(), "available on this host (MemAvailable)"


def tokens_that_fit(per_rank, available: int, sharing: int) -> int:
    """The estimate is affine in tokens: -> the largest count that fits, rounded down to 64."""
    fit = (available // sharing - per_rank(0)) // (per_rank(1) - per_rank(0))
    return fit // 64 * 64 if fit >= 64 else max(fit, 0)


def memory_advice(args, per_rank, tokens, available, where, sharing, on_cuda) -> str:
    fit = tokens_that_fit(per_rank, available, sharing)
    shrink = (f"--tokens {fit} or fewer fits (e.g. bash scripts/bench.sh --preset {args.preset} --tokens {fit})"
              if fit > 0 else "no token count fits at this hidden size: lower --hidden")
    split = "" if on_cuda else f" ({per_rank(tokens) / GiB:.2f} GiB per rank x {sharing} ranks)"
    fewer = "" if on_cuda else "; or run fewer ranks (MOE_COMM_NPROC=2)"
    return (f"[bench] not enough memory: this run needs about {per_rank(tokens) * sharing / GiB:.1f} GiB{split}, "
            f"and {available / GiB:.1f} GiB is {where} (model: bench/README.md, Memory).\n"
            f"[bench] shrink it: {shrink}{fewer}; --no-memory-check runs it anyway.")


def check_memory(args) -> int:
    """Before any process group or tensor exists, so that refusing cannot hang a peer: exits 1
    on every rank when the run will not fit (the message on rank 0; on CUDA on each rank whose
    GPU is short). CPU: the ranks of this host share its memory; CUDA: one GPU per rank.
    -> the estimate per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    on_cuda, tokens = wants_cuda(args.device), max(token_counts(args))
    stages, elem = planned_stages(args, world, local_world), DTYPES[args.dtype].itemsize
    per_rank = lambda t: estimate_rank_bytes(t, args.hidden, elem, args.topk, world, stages, on_cuda)  # noqa: E731
    sharing = 1 if on_cuda else local_world
    available, where = available_memory(on_cuda)
    speaks = os.environ.get("RANK", "0") == "0"
    summary = f"[bench] memory estimate at {tokens} tokens/rank: {per_rank(tokens) / GiB:.2f} GiB per rank"
    if not on_cuda:
        summary += f", {per_rank(tokens) * sharing / GiB:.2f} GiB for the {sharing} ranks on this host"
    summary += f"; {available / GiB:.1f} GiB {where}" if available is not None else " (available memory unknown)"
    progress(0 if speaks else 1, summary)
    if available is not None and per_rank(tokens) * sharing > available and not args.no_memory_check:
        if speaks or on_cuda:
            print(memory_advice(args, per_rank, tokens, available, where, sharing, on_cuda), file=sys.stderr,
                  flush=True)
        raise SystemExit(1)
    return per_rank(tokens)


# ---- routing and bytes (definitions in bench/README.md) -----------------------------------

def make_routing(args, rank, num_nodes, device):
    gen = torch.Generator().manual_seed(1234 + rank)
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    if args.skew:
        logits = logits - args.skew * torch.linspace(0, 1, args.experts)
    max_nodes = min(args.max_nodes or num_nodes, num_nodes)
    idx, weights = moe_comm.node_limited_topk(logits, args.topk, num_nodes, max_nodes, score_func="softmax")
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(DTYPES[args.dtype])
    return x.to(device), idx.to(device), weights.to(device)


def _sum_over_ranks(values, buf):
    t = torch.tensor(values, dtype=torch.int64, device=buf.device)
    dist.all_reduce(t, group=buf.group)
    return [int(v) for v in t.tolist()]


def logical_bytes(idx, buf, row_bytes):
    """DeepEP's definitions, summed over ranks, a rank's rows to itself included: intra = one
    row per (token, destination rank) on the token's node, inter = one per distinct (token,
    destination node) off it. -> (intra, inter) bytes."""
    topo = buf.topology
    dest_rank = (idx.cpu() // buf.experts_per_rank).masked_fill(idx.cpu() < 0, -1)
    intra = inter = 0
    for row in dest_rank.tolist():
        ranks = {d for d in row if d >= 0}
        intra += sum(1 for d in ranks if topo.node_of(d) == topo.node)
        inter += len({topo.node_of(d) for d in ranks} - {topo.node})
    return tuple(n * row_bytes for n in _sum_over_ranks([intra, inter], buf))


def moe_comm_wire_bytes(idx, buf, row_bytes):
    """What moe_comm puts on links per dispatch, summed over ranks, by the planner's row count
    (the definition of handle.stats: no rows to self; hierarchical: both stages).
    -> (intra, inter) bytes."""
    idx = idx.cpu()
    source = torch.full((idx.shape[0],), buf.rank, dtype=torch.int64)
    rows = link_rows(idx, source, buf.num_experts, buf.world_size, buf.topology.ranks_per_node, buf.hierarchical)
    local = [int(rows["intra_sent"].sum()), int(rows["inter_sent"].sum())]
    return tuple(n * row_bytes for n in _sum_over_ranks(local, buf))


def baseline_wire_bytes(handle, buf, row_bytes):
    """What the baseline puts on links per dispatch (one row per (token, expert) pair; its
    router weights not counted), summed over ranks, rows to self excluded. -> (intra, inter)."""
    topo = buf.topology
    intra = sum(n for d, n in enumerate(handle.send_splits) if d != buf.rank and topo.node_of(d) == topo.node)
    inter = sum(n for d, n in enumerate(handle.send_splits) if topo.node_of(d) != topo.node)
    return tuple(n * row_bytes for n in _sum_over_ranks([intra, inter], buf))


# ---- timing ------------------------------------------------------------------------------

def progress(rank, message, end="\n"):
    """Rank 0 says what it is doing, at once: large runs take minutes per op."""
    if rank == 0:
        print(message, end=end, flush=True)


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


def capacity_kwargs(args):
    """moe_comm.dispatch's keyword arguments of this run: capacity, padding and the wire dtype."""
    return dict(capacity_factor=args.capacity_factor, drop_policy=args.drop_policy,
                expert_alignment=args.expert_alignment, pad_to_capacity=args.pad_to_capacity,
                wire_dtype=torch.float8_e4m3fn if args.wire_dtype == "fp8" else None)


def dispatch_row_bytes(args, x) -> int:
    """Payload bytes of one dispatch row on moe_comm's wire (as handle.stats counts them)."""
    return plan_row_bytes(args.hidden, x.element_size(), args.wire_dtype)


def kept_routing(args, idx, weights):
    """The routing capacity leaves (the baseline gets it as its input: its time does not include
    choosing what to drop; moe_comm's does). -> kept idx, pairs dropped on this rank."""
    if args.capacity_factor is None:
        return idx, 0
    tokens = max(token_counts(args)) if args.static else idx.shape[0]  # the Buffer's budget, as C uses it
    capacity = expert_capacity(args.capacity_factor, tokens, idx.shape[1], args.experts)
    stream = torch.cuda.current_stream().cuda_stream if idx.is_cuda else 0
    kept, dropped = C.drop_by_capacity(idx, weights, args.experts, capacity, args.drop_policy == "probs", stream)
    return kept, int(dropped)


def check_against_baseline(x, idx, kept, weights, buf, experts, args):
    """Same results first: the baseline is only a baseline if it computes the same thing (with
    capacity: the baseline dispatches the kept routing). -> (moe_comm's results, the baseline's)."""
    ours = moe_comm.dispatch(x, idx, weights, buf, **capacity_kwargs(args))
    # FP8 rows: the baseline, given x as the FP8 wire delivers it, must give the same rows.
    theirs = baseline.dispatch(reference.over_fp8_wire([x])[0] if args.wire_dtype == "fp8" else x, kept, weights,
                               experts)
    # Our padding rows (--expert-alignment) aside, the rows are the same.
    real = torch.cat([torch.arange(int(p)) < int(r) for p, r in zip(ours[2], theirs[2].cpu())]).to(x.device)
    if args.pad_to_capacity:  # padding inside every block: the real rows are those with a weight
        real = ours[1] != 0
    assert torch.equal(ours[0][real], theirs[0]) and torch.equal(ours[1][real], theirs[1]), "baseline disagrees"
    y_ours = moe_comm.combine(ours[0], ours[3], weights)
    y_theirs = baseline.combine(theirs[0], theirs[3])
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2e-2, atol=2e-2)
    return ours, theirs


def make_ops(x, idx, kept, weights, buf, experts, ours, theirs, args):
    def ours_roundtrip():
        xg = x.detach().requires_grad_()
        recv_x, recv_w, counts, handle = moe_comm.dispatch(xg, idx, weights, buf, **capacity_kwargs(args))
        moe_comm.combine(recv_x * 2, handle, weights).float().sum().backward()

    def theirs_roundtrip():
        xg = x.detach().requires_grad_()
        recv_x, recv_w, counts, handle = baseline.dispatch(xg, kept, weights, experts, differentiable=True)
        baseline.combine(recv_x * 2, handle, differentiable=True).float().sum().backward()

    return {
        "moe_comm": {
            "dispatch": lambda: moe_comm.dispatch(x, idx, weights, buf, **capacity_kwargs(args)),
            "combine": lambda: moe_comm.combine(ours[0], ours[3], weights),
            "roundtrip": ours_roundtrip,
        },
        "torch_baseline": {
            "dispatch": lambda: baseline.dispatch(x, kept, weights, experts),
            "combine": lambda: baseline.combine(theirs[0], theirs[3]),
            "roundtrip": theirs_roundtrip,
        },
    }


def gbps(nbytes, world, seconds, op):
    """Per rank: bytes per dispatch summed over ranks / ranks / median; roundtrip has none."""
    return nbytes / world / seconds / 1e9 if op != "roundtrip" else None


def make_record(args, buf, world, impl, op, s, wire, logical):
    median = statistics.median(s)
    wire = wire.get(op, (0, 0))
    topo = buf.topology
    return dict(
        impl=impl, op=op, median_us=median * 1e6, p10_us=s[len(s) // 10] * 1e6,
        p90_us=s[min(len(s) - 1, (9 * len(s)) // 10)] * 1e6,
        bytes_wire_intra=wire[0], bytes_wire_inter=wire[1],
        bytes_logical_intra=logical[0], bytes_logical_inter=logical[1],
        gbps_wire=gbps(wire[0] + wire[1], world, median, op),
        gbps_wire_intra=gbps(wire[0], world, median, op), gbps_wire_inter=gbps(wire[1], world, median, op),
        gbps_logical=gbps(logical[0] + logical[1], world, median, op),
        world_size=world, preset=args.preset, tokens=args.tokens, hidden=args.hidden,
        experts=args.experts, topk=args.topk, dtype=args.dtype, backend=buf.backend, device=buf.device.type,
        nodes=topo.num_nodes, ranks_per_node=topo.ranks_per_node, hierarchical=buf.hierarchical,
        max_nodes=args.max_nodes, skew=args.skew, static=bool(buf.static_tokens(args.pad_to_capacity)),
        wire_dtype=args.wire_dtype if impl == "moe_comm" else "native")


def peak_memory(buf):
    """-> {peak host RSS of the largest rank, summed over ranks, peak device bytes} so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    device = torch.cuda.max_memory_allocated(buf.device) if buf.device.type == "cuda" else 0
    t = torch.tensor([rss, device], dtype=torch.int64, device=buf.device)
    largest, total = t.clone(), t.clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=buf.group)
    dist.all_reduce(total, group=buf.group)
    return dict(peak_rss_bytes_max_rank=int(largest[0]), peak_rss_bytes_sum_ranks=int(total[0]),
                peak_device_bytes_max_rank=int(largest[1]) if buf.device.type == "cuda" else None)


def measure(args, buf, world):
    """Checks moe_comm against the baseline, then times both. -> records (one per impl x op)."""
    x, idx, weights = make_routing(args, buf.rank, buf.topology.num_nodes, buf.device)
    progress(buf.rank, f"[bench] tokens {args.tokens}: checking moe_comm against the baseline ...")
    kept, dropped = kept_routing(args, idx, weights)
    ours, theirs = check_against_baseline(x, idx, kept, weights, buf, args.experts, args)
    assert int(ours[3].stats["pairs_dropped"]) == dropped
    dropped, routed = _sum_over_ranks([dropped, int((idx >= 0).sum())], buf)
    row_bytes = args.hidden * x.element_size()
    rows_sent = moe_comm_wire_bytes(kept, buf, 1)
    if buf.static_tokens(args.pad_to_capacity):  # fixed blocks: the wire carries B rows per peer
        stats = ours[3].stats
        rows_sent = tuple(_sum_over_ranks([stats["rows_sent_intra_node"], stats["rows_sent_inter_node"]], buf))
    # Dispatch rows may be FP8 (--wire-dtype); combine's are in x's dtype.
    ours_wire = {"dispatch": tuple(n * dispatch_row_bytes(args, x) for n in rows_sent),
                 "combine": tuple(n * row_bytes for n in rows_sent)}
    theirs_wire = baseline_wire_bytes(theirs[3], buf, row_bytes)
    wire = {"moe_comm": ours_wire, "torch_baseline": {"dispatch": theirs_wire, "combine": theirs_wire}}
    logical = logical_bytes(kept, buf, row_bytes)
    records = []
    for impl, by_op in make_ops(x, idx, kept, weights, buf, args.experts, ours, theirs, args).items():
        for op, fn in by_op.items():
            progress(buf.rank, f"[bench] tokens {args.tokens}: {impl} {op} ...", end="")
            s = sorted(timed(fn, args, buf.group, buf.device))
            progress(buf.rank, f" {statistics.median(s) * 1e3:.2f} ms")
            records.append(make_record(args, buf, world, impl, op, s, wire[impl], logical))
            records[-1]["drop_rate"] = dropped / routed if routed else 0.0
    base = {r["op"]: r["median_us"] for r in records if r["impl"] == "torch_baseline"}
    memory = peak_memory(buf)
    for r in records:
        r["speedup_vs_baseline"] = base[r["op"]] / r["median_us"]
        r.update(memory)
    return records


# ---- what was run, where -----------------------------------------------------------------

def git(*argv):
    try:
        out = subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(world):
    """Versions and provenance, stored in every record's "run"."""
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return dict(
        moe_comm_version=moe_comm.__version__, build_info=moe_comm.build_info(), torch_version=torch.__version__,
        python_version=platform.python_version(), git_commit=commit,
        git_dirty=bool(status) if status is not None else None, hostname=socket.gethostname(),
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), world_size=world,
        command=shlex.join(sys.argv), wrapper_command=os.environ.get("MOE_COMM_BENCH_COMMAND"))


# ---- report ------------------------------------------------------------------------------

def fmt_gbps(value):
    return f"{value:.3f}" if value is not None else "-"


def fmt_bytes(n):
    return f"{n / 1e6:.2f} MB"


def print_table(records):
    print(f"{'tokens':>6} {'op':<10} {'impl':<15} {'median us':>11} {'p10 us':>10} {'p90 us':>10} "
          f"{'wire GB/s':>10} {'logical GB/s':>13} {'speed-up':>9}")
    for r in sorted(records, key=lambda r: (r["tokens"], OPS.index(r["op"]), r["impl"])):
        print(f"{r['tokens']:>6} {r['op']:<10} {r['impl']:<15} {r['median_us']:>11.1f} {r['p10_us']:>10.1f} "
              f"{r['p90_us']:>10.1f} {fmt_gbps(r['gbps_wire']):>10} {fmt_gbps(r['gbps_logical']):>13} "
              f"{r['speedup_vs_baseline']:>8.2f}x")


BYTES_ROWS = [  # (label, record key prefix, impl or None for both, op)
    ("on-wire, moe_comm dispatch (= handle.stats)", "bytes_wire", "moe_comm", "dispatch"),
    ("on-wire, moe_comm combine", "bytes_wire", "moe_comm", "combine"),
    ("on-wire, torch_baseline (a row per (token, expert))", "bytes_wire", "torch_baseline", "dispatch"),
    ("logical (a rank's own rows included; both impls)", "bytes_logical", None, "dispatch"),
]


def print_bytes(records):
    print("GB/s = bytes per dispatch summed over ranks / ranks / median (per rank). wire GB/s: this impl's\n"
          "on-wire bytes (rows a rank sends itself excluded); logical GB/s: logical bytes (DeepEP's\n"
          "definitions, own rows included). Definitions: bench/README.md.")
    for tokens in sorted({r["tokens"] for r in records}):
        at = {(r["impl"], r["op"]): r for r in records if r["tokens"] == tokens}
        title = f"bytes per call at {tokens} tokens/rank, summed over ranks:"
        print(f"{title:<64} {'intra-node':>12} {'inter-node':>12}")
        for label, key, impl, op in BYTES_ROWS:
            r = at[(impl or "moe_comm", op)]
            print(f"  {label:<62} {fmt_bytes(r[key + '_intra']):>12} {fmt_bytes(r[key + '_inter']):>12}")


def capacity_note(args, records) -> str:
    if args.capacity_factor is None:
        return ""
    rates = sorted({round(r["drop_rate"], 4) for r in records})
    return (f", capacity factor {args.capacity_factor:g} ({args.drop_policy}): "
            f"{', '.join(f'{100 * x:.1f}%' for x in rates)} of pairs dropped")


def report(args, buf, world, records):
    """Prints a table per token count on rank 0 and writes --json."""
    if buf.rank != 0:
        return
    topo, run = buf.topology, run_metadata(world)
    for r in records:
        r["run"] = run
    print(f"moe_comm {moe_comm.__version__} ({(run['git_commit'] or 'no git')[:10]}), torch {torch.__version__} | "
          f"{args.preset}: {world} ranks, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, {args.dtype}"
          f"{' (dispatch rows in FP8)' if args.wire_dtype == 'fp8' else ''}, {buf.backend}/{buf.device}"
          f"{f' ({buf.cpu_transport} wire)' if buf.cpu_transport else ''}, "
          f"{topo.num_nodes}x{topo.ranks_per_node} nodes x ranks{', hierarchical' if buf.hierarchical else ''}"
          f"{f', max {args.max_nodes} nodes/token' if args.max_nodes else ''}"
          f"{', no combine status' if args.no_combine_status else ''}"
          f"{capacity_note(args, records)}, "
          f"{args.iters} iters (slowest rank per iter)")
    print_table(records)
    print_bytes(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    estimate = check_memory(args)
    init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {world}")
    hierarchical = {"auto": "auto", "on": True, "off": False}[args.hierarchical]
    if args.static and not (args.pad_to_capacity and args.capacity_factor):
        raise SystemExit("--static needs --pad-to-capacity and --capacity-factor")
    buf = moe_comm.Buffer(num_experts=args.experts, ranks_per_node=args.ranks_per_node, hierarchical=hierarchical,
                          combine_status=not args.no_combine_status, cpu_transport=args.cpu_transport,
                          max_tokens_per_rank=max(token_counts(args)) if args.static else None)
    records = []
    for tokens in token_counts(args):
        args.tokens = tokens
        records += measure(args, buf, world)
    for r in records:
        r["memory_estimate_bytes_per_rank"] = estimate
    report(args, buf, world, records)
    if rank == 0 and args.plot:
        from plot import plot_records
        plot_records(records, args.plot)
        print(f"wrote {args.plot}")
    dist.barrier()
    buf.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
