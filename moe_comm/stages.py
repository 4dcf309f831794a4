"""The wire as a list of stages. Each stage is one all-to-all over one process group.

flat:          [group]                       every rank sends to every rank
hierarchical:  [rail (inter-node), node]     a token crosses the network once per destination
               node, to the rank with its own local index there (rail-aligned: each GPU uses
               its own NIC), which forwards it inside the node to every rank that needs it.

A stage's destinations are its group's ranks; destination d owns the experts
[d * experts_per_dest, (d + 1) * experts_per_dest) of the stage's expert numbering (global ids
in the first stage, node-local ids in the node stage).
"""

import datetime
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from .topology import Topology


@dataclass
class Stage:
    name: str               # "flat", "inter_node" or "intra_node": names every error
    group: object           # process group of this stage's ranks, in destination order
    size: int               # destinations
    index: int              # this rank's place in the group
    experts_per_dest: int
    global_ranks: List[int]  # group index -> rank in the Buffer's group
    crosses_nodes: bool     # rows to other destinations leave the node
    comm: object = None     # our NCCL communicator over `group` (CUDA Buffers with size > 1)

    @property
    def num_experts(self) -> int:
        return self.size * self.experts_per_dest


def new_gloo_group(global_ranks: List[int], timeout: Optional[float]):
    """A gloo process group over these default-group ranks (new_group: collective over the
    default group), with the Buffer's timeout when it has one."""
    kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
    return dist.new_group(global_ranks, backend="gloo", **kwargs)


def flat_stages(group, topo: Topology, experts_per_rank: int) -> List[Stage]:
    return [Stage("flat", group, topo.world_size, topo.rank, experts_per_rank,
                  list(range(topo.world_size)), crosses_nodes=topo.num_nodes > 1)]


def hierarchical_stages(group, topo: Topology, experts_per_rank: int, timeout: Optional[float]) -> List[Stage]:
    """Creates one group per node and one per local index (rail). new_group is collective:
    every rank of the default group enters every call, in the same order."""
    P, N = topo.ranks_per_node, topo.num_nodes
    group_ranks = dist.get_process_group_ranks(group)  # our index -> global rank
    # gloo whatever the Buffer's backend: on the CPU path these groups carry the tokens; on the
    # CUDA path they only bootstrap our NCCL communicators, which must not cost torch NCCL ones.
    rails = [[n * P + l for n in range(N)] for l in range(P)]
    nodes = [[n * P + l for l in range(P)] for n in range(N)]
    rail_groups = [new_gloo_group([group_ranks[r] for r in ranks], timeout) for ranks in rails]
    node_groups = [new_gloo_group([group_ranks[r] for r in ranks], timeout) for ranks in nodes]
    local, node = topo.rank % P, topo.node
    return [
        Stage("inter_node", rail_groups[local], N, node, P * experts_per_rank, rails[local], crosses_nodes=True),
        Stage("intra_node", node_groups[node], P, local, experts_per_rank, nodes[node], crosses_nodes=False),
    ]
