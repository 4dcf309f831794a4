"""python -m moe_comm.plan: bytes per link and a predicted time for dispatch and combine on a
cluster, flat vs hierarchical vs hierarchical with node-limited routing.

Row accounting is the one handle.stats reports (tested against real runs): flat mode sends a
token once per destination rank; hierarchical mode once per destination node over the network
(to the same local index), then the forwarder sends it once to every other rank of its node
that needs it. A rank's rows to itself cross no link. Combine moves the same rows back.
Row bytes are the payload: H x element size; with --wire-dtype fp8 a dispatch row is
H + 4 ceil(H / 128) bytes (API.md: FP8 on the wire) and combine keeps the activations' dtype.

Busiest GPU: every GPU routes its tokens independently from the same distribution, so each
GPU's rows per link are expected values computed from the probability that a token sends a
row to each rank and node (estimated from --sample-tokens routed tokens; exact by symmetry
for unskewed synthetic routing). Taking the max over GPUs of small noisy samples instead
overstates the busiest GPU (by 3-37% with 256 tokens per GPU at DeepSeek-V3's shape).

Time model, per stage: latency + the busiest GPU's bytes (sent or received, whichever is
larger) / that link's bandwidth. Timed bytes are wire rows: the payload, then per top-k slot
8 bytes of metadata (dispatch), padded to 16 bytes (csrc/core/row_format.h); the bytes printed
are the payload. With --nic-per node one NIC serves a whole node (the emulated cluster of
bench/cluster.py, or nodes with a single NIC): the busiest node's bytes cross it. Flat mode's NVLink and network traffic overlap (one stage:
the slower of the two); hierarchical mode's two stages run one after the other.
Bandwidths are achieved all-to-all rates in GB/s (gigabytes, 1e9 bytes, per second), per GPU
and direction, not line rates; sources in bench/README.md.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from .fp8 import scale_columns
from .routing import node_limited_topk

PRESETS = {  # tokens per rank, hidden, experts, top-k, bytes per element, max nodes per token
    "tiny": dict(tokens=512, hidden=256, experts=16, topk=4, elem_bytes=4, max_nodes=None),
    "mixtral-8x7b": dict(tokens=4096, hidden=4096, experts=8, topk=2, elem_bytes=2, max_nodes=None),
    "deepseek-v3": dict(tokens=4096, hidden=7168, experts=256, topk=8, elem_bytes=2, max_nodes=4),
    "qwen3-moe": dict(tokens=4096, hidden=4096, experts=128, topk=8, elem_bytes=2, max_nodes=None),
}

# Achieved, not peak (sources in bench/README.md): NCCL's effective NVLink 4 rate on H100 is
# ~370 GB/s of the 450 GB/s line rate; a 400 Gb/s (50 GB/s) InfiniBand NIC delivers ~43-49 GB/s.
DEFAULT_NVLINK_GBYTES_PER_S = 350.0
DEFAULT_NIC_GBYTES_PER_S = 45.0
# Enough tokens that skewed routing's per-rank hit probabilities are estimated to ~1-2%.
DEFAULT_SAMPLE_TOKENS = 16384


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    nvlink_gbytes_per_s: float = DEFAULT_NVLINK_GBYTES_PER_S  # per GPU, per direction, achieved
    nic_gbytes_per_s: float = DEFAULT_NIC_GBYTES_PER_S        # per GPU, per direction, achieved
    nvlink_latency_us: float = 5.0
    nic_latency_us: float = 15.0
    nic_per_node: bool = False  # one NIC shared by the node's GPUs (nic_gbytes_per_s is then the node's)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def _distinct(keys: torch.Tensor) -> torch.Tensor:
    """[T, K] keys (-1 = none) -> mask of each row's first occurrence of every key >= 0."""
    sorted_keys, order = keys.sort(dim=1)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    first &= sorted_keys >= 0
    return torch.zeros_like(first).scatter(1, order, first)


def _destination_ranks(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    return (topk_idx // (num_experts // world_size)).masked_fill(topk_idx < 0, -1)


def link_rows(topk_idx: torch.Tensor, source: torch.Tensor, num_experts: int, world_size: int,
              ranks_per_node: int, hierarchical: bool) -> dict:
    """Token rows per rank and link class for one dispatch.

    topk_idx [T, K] (every rank's tokens stacked), source [T] (each token's rank).
    -> {"intra_sent", "intra_recv", "inter_sent", "inter_recv"}: [world_size] int64 each."""
    P = ranks_per_node
    dest = _destination_ranks(topk_idx, num_experts, world_size)
    src = source.unsqueeze(1).expand_as(dest)
    count = lambda who, mask: torch.bincount(who[mask], minlength=world_size)  # noqa: E731
    pair = _distinct(dest)                       # one row per (token, destination rank)
    same_node = (dest // P) == (src // P)
    if not hierarchical:
        intra = pair & same_node & (dest != src)
        inter = pair & ~same_node
        return {"intra_sent": count(src, intra), "intra_recv": count(dest, intra),
                "inter_sent": count(src, inter), "inter_recv": count(dest, inter)}
    dest_node = (dest // P).masked_fill(dest < 0, -1)
    node_pair = _distinct(dest_node)            # one row per (token, destination node)
    forwarder = dest_node * P + src % P         # same local index on the destination node
    inter = node_pair & (dest_node != src // P)
    intra = pair & (dest != forwarder)          # forwarder -> every other rank that needs it
    return {"intra_sent": count(forwarder, intra), "intra_recv": count(dest, intra),
            "inter_sent": count(src, inter), "inter_recv": count(forwarder, inter)}


def hit_probabilities(topk_idx: torch.Tensor, num_experts: int, world_size: int, ranks_per_node: int):
    """-> (rank_p [W], node_p [N]) float64: the fraction of tokens in topk_idx [T, K] that send a
    row to each rank (at least one expert there) and to each node."""
    tokens = max(topk_idx.shape[0], 1)
    dest = _destination_ranks(topk_idx, num_experts, world_size)
    dest_node = (dest // ranks_per_node).masked_fill(dest < 0, -1)
    rank_hits = torch.bincount(dest[_distinct(dest)], minlength=world_size)
    node_hits = torch.bincount(dest_node[_distinct(dest_node)], minlength=world_size // ranks_per_node)
    return rank_hits.double() / tokens, node_hits.double() / tokens


def expected_link_rows(rank_p: torch.Tensor, node_p: torch.Tensor, tokens: float, ranks_per_node: int,
                       hierarchical: bool) -> Dict[str, torch.Tensor]:
    """link_rows' counts in expectation, when every GPU routes `tokens` tokens that hit rank d
    with probability rank_p[d] and node m with probability node_p[m] (linearity of expectation:
    a count of rows is a sum of hit indicators). -> the same keys, [W] float64 each."""
    W, P = rank_p.numel(), ranks_per_node
    N = W // P
    node_of = torch.arange(W) // P
    node_mass = rank_p.view(N, P).sum(1)[node_of]    # P(hit) summed over each rank's own node
    if not hierarchical:
        return {"intra_sent": tokens * (node_mass - rank_p), "inter_sent": tokens * (rank_p.sum() - node_mass),
                "intra_recv": tokens * (P - 1) * rank_p, "inter_recv": tokens * (W - P) * rank_p}
    # Forwarder f = node m, local index l serves the N sources with local index l, its own included.
    return {"inter_sent": tokens * (node_p.sum() - node_p[node_of]),
            "inter_recv": tokens * (N - 1) * node_p[node_of],
            "intra_sent": tokens * N * (node_mass - rank_p),
            "intra_recv": tokens * N * (P - 1) * rank_p}


def synthetic_routing(cluster: Cluster, tokens: int, experts: int, topk: int, max_nodes: Optional[int],
                      skew: float, seed: int = 0) -> torch.Tensor:
    """-> topk_idx [tokens, K]: softmax routing over random logits, low experts `skew` hotter,
    node-limited when max_nodes is set. One sample stands for every GPU's routing (they all
    draw from the same distribution)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen) - skew * torch.linspace(0, 1, experts)
    nodes = cluster.nodes
    limit = min(max_nodes or nodes, nodes)
    if experts % nodes:
        nodes, limit = 1, 1  # fewer experts than nodes: no node structure to limit
    idx, _ = node_limited_topk(logits, topk, nodes, limit, score_func="softmax", normalize=False)
    return idx


def expected_rows(cluster: Cluster, topk_idx: torch.Tensor, experts: int, tokens: int, hierarchical: bool,
                  symmetric: bool) -> Dict[str, torch.Tensor]:
    """Every GPU's expected rows per link for `tokens` tokens routed like topk_idx. symmetric:
    the routing treats all experts alike, so every rank (node) is hit equally often and the
    sample's mean is the exact per-rank probability (no per-rank sampling noise)."""
    rank_p, node_p = hit_probabilities(topk_idx, experts, cluster.gpus, cluster.gpus_per_node)
    if symmetric:
        rank_p, node_p = torch.full_like(rank_p, rank_p.mean()), torch.full_like(node_p, node_p.mean())
    return expected_link_rows(rank_p, node_p, tokens, cluster.gpus_per_node, hierarchical)


@dataclass
class Prediction:
    scenario: str
    gpus: int
    nodes: int
    nic_bytes_per_gpu: float      # busiest GPU, max(sent, received), per dispatch
    nvlink_bytes_per_gpu: float
    dispatch_us: float
    combine_us: float
    nic_wire_bytes: float = 0.0   # what the busiest NIC carries per dispatch: wire rows (GPU or node)


def busiest_gpu_bytes(rows: Dict[str, torch.Tensor], link: str, row_bytes: int) -> float:
    return float(torch.maximum(rows[f"{link}_sent"], rows[f"{link}_recv"]).max()) * row_bytes


def busiest_nic_rows(cluster: Cluster, rows: Dict[str, torch.Tensor]) -> float:
    """Rows through the busiest NIC, sent or received: a GPU's own, or with nic_per_node its
    node's (the sum over the node's GPUs)."""
    sent, recv = rows["inter_sent"], rows["inter_recv"]
    if cluster.nic_per_node:
        sent, recv = (t.view(cluster.nodes, cluster.gpus_per_node).sum(1) for t in (sent, recv))
    return float(torch.maximum(sent, recv).max())


@dataclass
class RowBytes:
    """Bytes of one row: its payload (what handle.stats counts) and on the wire, dispatch and
    combine (FP8 dispatch rows are smaller; combine's stay in the activations' dtype)."""
    dispatch: int
    dispatch_wire: int
    combine_wire: int


def predict(cluster: Cluster, rows: Dict[str, torch.Tensor], row: RowBytes, hierarchical: bool,
            scenario: str) -> Prediction:
    nic_rows = busiest_nic_rows(cluster, rows)
    nvl_rows = busiest_gpu_bytes(rows, "intra", 1)

    def time_us(wire: int) -> float:
        return _stage_time(cluster, nic_rows * wire, nvl_rows * wire, hierarchical)

    return Prediction(scenario, cluster.gpus, cluster.nodes, busiest_gpu_bytes(rows, "inter", row.dispatch),
                      nvl_rows * row.dispatch, time_us(row.dispatch_wire), time_us(row.combine_wire),
                      nic_rows * row.dispatch_wire)


def _stage_time(cluster: Cluster, nic: float, nvl: float, hierarchical: bool) -> float:
    nic_us = (cluster.nic_latency_us if cluster.nodes > 1 else 0.0) + nic / (cluster.nic_gbytes_per_s * 1e3)
    nvl_us = ((cluster.nvlink_latency_us if cluster.gpus_per_node > 1 else 0.0)
              + nvl / (cluster.nvlink_gbytes_per_s * 1e3))
    return nic_us + nvl_us if hierarchical else max(nic_us, nvl_us)


def dispatch_row_bytes(hidden: int, elem_bytes: int, wire_dtype: str = "native") -> int:
    """Payload bytes of one dispatch row: H x element size, or with wire_dtype "fp8" one byte
    per element plus a float32 scale per 128 (API.md: FP8 on the wire)."""
    if wire_dtype == "fp8":
        return hidden + 4 * scale_columns(hidden)
    if wire_dtype != "native":
        raise ValueError(f"wire_dtype: must be 'native' or 'fp8', got {wire_dtype!r}")
    return hidden * elem_bytes


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def _row(n: int) -> int:
    return max(_align16(n), 16)  # an empty row still takes 16 bytes (row_format.h)


def wire_row_bytes(hidden: int, elem_bytes: int, topk: int, wire_dtype: str = "native") -> RowBytes:
    """A row's bytes as csrc/core/row_format.h lays it out: payload (FP8: then its scales, each
    part 16-aligned), then 8 bytes of metadata per top-k slot (dispatch), padded to 16."""
    payload = dispatch_row_bytes(hidden, elem_bytes, wire_dtype)
    front = (_align16(hidden) + _align16(payload - hidden)) if wire_dtype == "fp8" else _align16(payload)
    return RowBytes(payload, _row(front + 8 * topk), _row(hidden * elem_bytes))


def plan(cluster: Cluster, tokens: int, hidden: int, experts: int, topk: int, elem_bytes: int,
         max_nodes: Optional[int], skew: float = 0.0, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
         topk_idx: Optional[torch.Tensor] = None, wire_dtype: str = "native") -> List[Prediction]:
    """Predictions for one cluster: flat, hierarchical, and (with max_nodes) hierarchical with
    node-limited routing. Every GPU routes `tokens` tokens like `sample_tokens` simulated
    tokens (or like topk_idx [T, K], all of it); the busiest GPU's expected bytes per link.
    wire_dtype: "native" (x's dtype, elem_bytes) or "fp8" dispatch rows."""
    if experts % cluster.gpus:
        raise ValueError(f"experts: {experts} do not split over {cluster.gpus} GPUs")
    row = wire_row_bytes(hidden, elem_bytes, topk, wire_dtype)
    if topk_idx is not None:
        routings = [("", topk_idx, False)]
    else:
        routings = [("", synthetic_routing(cluster, sample_tokens, experts, topk, None, skew), skew == 0)]
        if max_nodes and cluster.nodes > 1 and max_nodes < cluster.nodes:
            routings.append((f"+node-limited({max_nodes})",
                             synthetic_routing(cluster, sample_tokens, experts, topk, max_nodes, skew), skew == 0))
    _, idx, symmetric = routings[0]
    out = [predict(cluster, expected_rows(cluster, idx, experts, tokens, False, symmetric), row, False, "flat")]
    if cluster.nodes > 1:
        for suffix, idx, symmetric in routings:
            rows = expected_rows(cluster, idx, experts, tokens, True, symmetric)
            out.append(predict(cluster, rows, row, True, "hierarchical" + suffix))
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except where there is none (None: the preset decides)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class _DeprecatedBandwidth(argparse.Action):
    """--nic-gbps / --nvlink-gbps: the old, ambiguous spelling of the GB/s flags; still accepted
    (they always meant gigabytes/s) with a warning that names the new flag."""

    def __init__(self, option_strings, dest, replacement, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated (it reads like gigabits/s but has always meant "
              f"gigaBYTES/s); use {self.replacement} {values}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_comm.plan", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS), help="model shape")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int,
                   help="one cluster of this many nodes (default: a sweep from 1 GPU to --max-gpus)")
    p.add_argument("--max-gpus", type=int, default=1024, help="the sweep's largest cluster (doubling from 1 GPU)")
    p.add_argument("--nvlink-GBps", dest="nvlink_gbytes_per_s", type=float, default=DEFAULT_NVLINK_GBYTES_PER_S,
                   help="achieved intra-node bandwidth per GPU and direction, in GB/s (gigabytes per second)")
    p.add_argument("--nic-GBps", dest="nic_gbytes_per_s", type=float, default=DEFAULT_NIC_GBYTES_PER_S,
                   help="achieved network bandwidth per GPU and direction, in GB/s (gigabytes per second; "
                        "a 400 Gb/s NIC is 50 GB/s of line rate)")
    for old, dest, new in (("--nvlink-gbps", "nvlink_gbytes_per_s", "--nvlink-GBps"),
                           ("--nic-gbps", "nic_gbytes_per_s", "--nic-GBps")):
        p.add_argument(old, dest=dest, type=float, action=_DeprecatedBandwidth, replacement=new,
                      default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--nic-per", choices=["gpu", "node"], default="gpu",
                   help="a NIC per GPU, or one per node shared by its GPUs (then --nic-GBps is the node's)")
    p.add_argument("--nvlink-latency-us", type=float, default=5.0, help="per intra-node stage")
    p.add_argument("--nic-latency-us", type=float, default=15.0, help="per network stage")
    for name in ("tokens", "hidden", "experts", "topk", "max-nodes"):
        what = "tokens per GPU; " if name == "tokens" else ""
        p.add_argument(f"--{name}", type=int, help=f"{what}default: the preset's")
    p.add_argument("--skew", type=float, default=0.0, help="0 = uniform routing; larger = hotter low experts")
    p.add_argument("--wire-dtype", choices=["native", "fp8"], default="native",
                   help="dispatch rows in the preset's dtype, or as FP8 with a float32 scale per 128 elements "
                        "(combine keeps the preset's dtype)")
    p.add_argument("--topk-idx", metavar="PATH", help="a saved topk_idx tensor [T, K] (torch.save), used as every "
                                                      "GPU's routing")
    p.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS,
                   help="simulated tokens from which each GPU's expected rows are computed (one sample for all GPUs)")
    p.add_argument("--json", metavar="PATH", help="write the predictions as a JSON list")
    return p


def _cluster_sizes(args) -> List[int]:
    if args.nodes:
        return [args.nodes * args.gpus_per_node]
    sizes, g = [], 1
    while g <= args.max_gpus:
        sizes.append(g)
        g *= 2
    return sizes


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    shape = dict(PRESETS[args.preset])
    for key in ("tokens", "hidden", "experts", "topk", "max_nodes"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    saved = torch.load(args.topk_idx) if args.topk_idx else None
    records = []
    print(f"moe_comm plan | {args.preset}: {shape['tokens']} tokens/GPU, hidden {shape['hidden']}, "
          f"{shape['experts']} experts, top-{shape['topk']}, {shape['elem_bytes']} B/element, dispatch rows "
          f"{dispatch_row_bytes(shape['hidden'], shape['elem_bytes'], args.wire_dtype)} B ({args.wire_dtype}) | "
          f"NVLink {args.nvlink_gbytes_per_s:g} GB/s, NIC {args.nic_gbytes_per_s:g} GB/s per {args.nic_per} and "
          f"direction (achieved, gigabytes/s)")
    print(f"{'GPUs':>5} {'nodes':>5}  {'scenario':<28} {'NIC MB/GPU':>11} {'NVLink MB/GPU':>14} "
          f"{'dispatch us':>12} {'combine us':>11}")
    for gpus in _cluster_sizes(args):
        per_node = min(args.gpus_per_node, gpus)
        if gpus % per_node or shape["experts"] % gpus:
            print(f"{gpus:>5}        (skipped: {shape['experts']} experts do not split over {gpus} GPUs "
                  f"of {per_node} per node)")
            continue
        cluster = Cluster(gpus // per_node, per_node, args.nvlink_gbytes_per_s, args.nic_gbytes_per_s,
                          args.nvlink_latency_us, args.nic_latency_us, args.nic_per == "node")
        for r in plan(cluster, shape["tokens"], shape["hidden"], shape["experts"], shape["topk"],
                      shape["elem_bytes"], shape["max_nodes"], args.skew, args.sample_tokens, saved, args.wire_dtype):
            records.append(asdict(r))
            print(f"{r.gpus:>5} {r.nodes:>5}  {r.scenario:<28} {r.nic_bytes_per_gpu / 1e6:>11.1f} "
                  f"{r.nvlink_bytes_per_gpu / 1e6:>14.1f} {r.dispatch_us:>12.1f} {r.combine_us:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
