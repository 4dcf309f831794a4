"""The wire as a list of stages. Each stage is one all-to-all over one process group.

flat:          [all ranks]                   every rank sends to every rank
hierarchical:  [rail (inter-node), node]     a token crosses the network once per destination
               node, to the rank with its own local index there (rail-aligned: each GPU uses
               its own NIC), which forwards it inside the node to every rank that needs it.

A stage's destinations are its group's ranks; destination d owns the experts
[d * experts_per_dest, (d + 1) * experts_per_dest) of the stage's expert numbering (global ids
in the first stage, node-local ids in the node stage).
"""

from dataclasses import dataclass
from typing import List

from .groups import connect_gloo_group
from .topology import Topology


@dataclass
class Stage:
    name: str               # "flat", "inter_node" or "intra_node": names every error
    group: object           # gloo process group of this stage's ranks, in destination order
    size: int               # destinations
    index: int              # this rank's place in the group
    experts_per_dest: int
    global_ranks: List[int]  # group index -> rank in the Buffer's group
    crosses_nodes: bool     # rows to other destinations leave the node
    comm: object = None     # our NCCL communicator over `group` (CUDA Buffers with size > 1)

    @property
    def num_experts(self) -> int:
        return self.size * self.experts_per_dest


def flat_stages(all_ranks_group, topo: Topology, experts_per_rank: int) -> List[Stage]:
    return [Stage("flat", all_ranks_group, topo.world_size, topo.rank, experts_per_rank,
                  list(range(topo.world_size)), crosses_nodes=topo.num_nodes > 1)]


def hierarchical_stages(buffer_name: str, default_ranks: List[int], topo: Topology, experts_per_rank: int,
                        timeout_s: float) -> List[Stage]:
    """Connects this rank's rail group (same local index on every node) and node group.
    default_ranks: Buffer-group index -> default-group rank. Collective over those two groups
    only. gloo whatever the Buffer's backend: on the CPU path these groups carry the tokens;
    on the CUDA path they only bootstrap our NCCL communicators."""
    P, N = topo.ranks_per_node, topo.num_nodes
    local, node = topo.rank % P, topo.node
    rail = [n * P + local for n in range(N)]
    members = [node * P + l for l in range(P)]
    rail_group = connect_gloo_group(buffer_name, f"rail{local}", [default_ranks[r] for r in rail], timeout_s)
    node_group = connect_gloo_group(buffer_name, f"node{node}", [default_ranks[r] for r in members], timeout_s)
    return [
        Stage("inter_node", rail_group, N, node, P * experts_per_rank, rail, crosses_nodes=True),
        Stage("intra_node", node_group, P, local, experts_per_rank, members, crosses_nodes=False),
    ]
