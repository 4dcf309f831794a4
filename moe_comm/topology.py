"""Which ranks of a group share a node. Ranks of one node are contiguous in the group."""

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.node_of(self.rank)


def _ranks_per_node_from_hosts(group, world_size: int) -> int:
    hosts = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    first = hosts[0]
    per_node = next((i for i, h in enumerate(hosts) if h != first), world_size)
    for start in range(0, world_size, per_node):
        block = hosts[start:start + per_node]
        if len(block) != per_node or len(set(block)) != 1 or (start and block[0] == hosts[start - 1]):
            raise ValueError(
                f"ranks_per_node: the group's ranks do not form equal, contiguous nodes by host name "
                f"({hosts}); pass ranks_per_node explicitly")
    return per_node


def resolve_topology(group, world_size: int, rank: int, ranks_per_node: Optional[int]) -> Topology:
    """ranks_per_node: an int (simulated or known nodes), or None: LOCAL_WORLD_SIZE (set by
    torchrun) when it divides the group, else grouping the ranks by host name."""
    if ranks_per_node is None:
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local and local.isdigit() and int(local) > 0 and world_size % int(local) == 0:
            ranks_per_node = min(int(local), world_size)
        else:
            ranks_per_node = _ranks_per_node_from_hosts(group, world_size)
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int):
        raise TypeError(f"ranks_per_node must be an int or None, got {type(ranks_per_node).__name__}")
    if ranks_per_node <= 0 or world_size % ranks_per_node != 0:
        raise ValueError(
            f"ranks_per_node={ranks_per_node} must be positive and divide the group size {world_size}")
    return Topology(world_size=world_size, rank=rank, ranks_per_node=ranks_per_node)
