"""python -m moe_comm.plan: bytes per link and a predicted time for dispatch and combine on a
cluster, flat vs hierarchical vs hierarchical with node-limited routing.

Row accounting is the one handle.stats reports (tested against real runs): flat mode sends a
token once per destination rank; hierarchical mode once per destination node over the network
(to the same local index), then the forwarder sends it once to every other rank of its node
that needs it. A rank's rows to itself cross no link. Combine moves the same rows back.

Time model, per stage: latency + the busiest GPU's bytes (sent or received, whichever is
larger) / that link's bandwidth. Flat mode's NVLink and network traffic overlap (one stage:
the slower of the two); hierarchical mode's two stages run one after the other.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from .routing import node_limited_topk

PRESETS = {  # tokens per rank, hidden, experts, top-k, bytes per element, max nodes per token
    "tiny": dict(tokens=512, hidden=256, experts=16, topk=4, elem_bytes=4, max_nodes=None),
    "mixtral-8x7b": dict(tokens=4096, hidden=4096, experts=8, topk=2, elem_bytes=2, max_nodes=None),
    "deepseek-v3": dict(tokens=4096, hidden=7168, experts=256, topk=8, elem_bytes=2, max_nodes=4),
    "qwen3-moe": dict(tokens=4096, hidden=4096, experts=128, topk=8, elem_bytes=2, max_nodes=None),
}


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    nvlink_gbps: float = 450.0     # per GPU, per direction (H100 NVLink 4)
    nic_gbps: float = 50.0         # per GPU, per direction (one 400 Gb/s NIC)
    nvlink_latency_us: float = 5.0
    nic_latency_us: float = 15.0

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


def link_rows(topk_idx: torch.Tensor, source: torch.Tensor, num_experts: int, world_size: int,
              ranks_per_node: int, hierarchical: bool) -> dict:
    """Token rows per rank and link class for one dispatch.

    topk_idx [T, K] (every rank's tokens stacked), source [T] (each token's rank).
    -> {"intra_sent", "intra_recv", "inter_sent", "inter_recv"}: [world_size] int64 each."""
    P = ranks_per_node
    dest = (topk_idx // (num_experts // world_size)).masked_fill(topk_idx < 0, -1)
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


def synthetic_routing(cluster: Cluster, tokens: int, experts: int, topk: int, max_nodes: Optional[int],
                      skew: float, seed: int = 0):
    """-> topk_idx [gpus * tokens, K], source [gpus * tokens]: softmax routing over random
    logits, low experts `skew` hotter, node-limited when max_nodes is set."""
    gen = torch.Generator().manual_seed(seed)
    total = cluster.gpus * tokens
    logits = torch.randn(total, experts, generator=gen) - skew * torch.linspace(0, 1, experts)
    nodes = cluster.nodes
    limit = min(max_nodes or nodes, nodes)
    if experts % nodes:
        nodes, limit = 1, 1  # fewer experts than nodes: no node structure to limit
    idx, _ = node_limited_topk(logits, topk, nodes, limit, score_func="softmax", normalize=False)
    return idx, torch.arange(cluster.gpus).repeat_interleave(tokens)


@dataclass
class Prediction:
    scenario: str
    gpus: int
    nodes: int
    nic_bytes_per_gpu: float      # busiest GPU, max(sent, received), per dispatch
    nvlink_bytes_per_gpu: float
    dispatch_us: float
    combine_us: float


def predict(cluster: Cluster, topk_idx, source, experts: int, row_bytes: int, hierarchical: bool,
            scale: float, scenario: str) -> Prediction:
    rows = link_rows(topk_idx, source, experts, cluster.gpus, cluster.gpus_per_node, hierarchical)
    nic = float(torch.maximum(rows["inter_sent"], rows["inter_recv"]).max()) * row_bytes * scale
    nvl = float(torch.maximum(rows["intra_sent"], rows["intra_recv"]).max()) * row_bytes * scale
    nic_us = (cluster.nic_latency_us if cluster.nodes > 1 else 0.0) + nic / (cluster.nic_gbps * 1e3)
    nvl_us = (cluster.nvlink_latency_us if cluster.gpus_per_node > 1 else 0.0) + nvl / (cluster.nvlink_gbps * 1e3)
    t = nic_us + nvl_us if hierarchical else max(nic_us, nvl_us)
    return Prediction(scenario, cluster.gpus, cluster.nodes, nic, nvl, t, t)


def plan(cluster: Cluster, tokens: int, hidden: int, experts: int, topk: int, elem_bytes: int,
         max_nodes: Optional[int], skew: float = 0.0, sample_tokens: int = 256,
         topk_idx: Optional[torch.Tensor] = None) -> List[Prediction]:
    """Predictions for one cluster: flat, hierarchical, and (with max_nodes) hierarchical with
    node-limited routing. Routing is simulated on `sample_tokens` tokens per GPU (or taken from
    topk_idx [T, K], used as every GPU's routing) and bytes scaled to `tokens`."""
    if experts % cluster.gpus:
        raise ValueError(f"experts: {experts} do not split over {cluster.gpus} GPUs")
    row_bytes = hidden * elem_bytes
    sample = min(tokens, sample_tokens)
    if topk_idx is not None:
        idx = topk_idx[:sample].repeat(cluster.gpus, 1)
        source = torch.arange(cluster.gpus).repeat_interleave(idx.shape[0] // cluster.gpus)
        sample = idx.shape[0] // cluster.gpus
        routings = [("", idx, source)]
    else:
        routings = [("", *synthetic_routing(cluster, sample, experts, topk, None, skew))]
        if max_nodes and cluster.nodes > 1 and max_nodes < cluster.nodes:
            routings.append((f"+node-limited({max_nodes})",
                             *synthetic_routing(cluster, sample, experts, topk, max_nodes, skew)))
    scale = tokens / sample
    out = [predict(cluster, routings[0][1], routings[0][2], experts, row_bytes, False, scale, "flat")]
    if cluster.nodes > 1:
        for suffix, idx, source in routings:
            out.append(predict(cluster, idx, source, experts, row_bytes, True, scale, "hierarchical" + suffix))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_comm.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS))
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, help="one cluster; default: a sweep from 1 GPU to --max-gpus")
    p.add_argument("--max-gpus", type=int, default=1024)
    p.add_argument("--nvlink-gbps", type=float, default=450.0)
    p.add_argument("--nic-gbps", type=float, default=50.0)
    p.add_argument("--nvlink-latency-us", type=float, default=5.0)
    p.add_argument("--nic-latency-us", type=float, default=15.0)
    for name in ("tokens", "hidden", "experts", "topk", "max-nodes"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--skew", type=float, default=0.0)
    p.add_argument("--topk-idx", metavar="PATH", help="a saved topk_idx tensor [T, K] (torch.save)")
    p.add_argument("--sample-tokens", type=int, default=256)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    shape = dict(PRESETS[args.preset])
    for key in ("tokens", "hidden", "experts", "topk", "max_nodes"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    saved = torch.load(args.topk_idx) if args.topk_idx else None
    if args.nodes:
        sizes = [args.nodes * args.gpus_per_node]
    else:
        sizes, g = [], 1
        while g <= args.max_gpus:
            sizes.append(g)
            g *= 2
    records = []
    print(f"moe_comm plan | {args.preset}: {shape['tokens']} tokens/GPU, hidden {shape['hidden']}, "
          f"{shape['experts']} experts, top-{shape['topk']}, {shape['elem_bytes']} B/element | "
          f"NVLink {args.nvlink_gbps} GB/s, NIC {args.nic_gbps} GB/s per GPU")
    print(f"{'GPUs':>5} {'nodes':>5}  {'scenario':<28} {'NIC MB/GPU':>11} {'NVLink MB/GPU':>14} "
          f"{'dispatch us':>12} {'combine us':>11}")
    for gpus in sizes:
        per_node = min(args.gpus_per_node, gpus)
        if gpus % per_node or shape["experts"] % gpus:
            print(f"{gpus:>5}        (skipped: {shape['experts']} experts do not split over {gpus} GPUs "
                  f"of {per_node} per node)")
            continue
        cluster = Cluster(gpus // per_node, per_node, args.nvlink_gbps, args.nic_gbps,
                          args.nvlink_latency_us, args.nic_latency_us)
        for r in plan(cluster, shape["tokens"], shape["hidden"], shape["experts"], shape["topk"],
                      shape["elem_bytes"], shape["max_nodes"], args.skew, args.sample_tokens, saved):
            records.append(asdict(r))
            print(f"{r.gpus:>5} {r.nodes:>5}  {r.scenario:<28} {r.nic_bytes_per_gpu / 1e6:>11.1f} "
                  f"{r.nvlink_bytes_per_gpu / 1e6:>14.1f} {r.dispatch_us:>12.1f} {r.combine_us:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
