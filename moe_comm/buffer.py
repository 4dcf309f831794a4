"""Buffer: the expert-parallel group, its expert placement, topology and transport."""

import collections
import datetime
import itertools
from typing import List, Optional

import torch
import torch.distributed as dist

from ._native import C
from .nccl_comm import create_nccl_communicator
from .stages import Stage, flat_stages, hierarchical_stages, new_gloo_group
from .topology import Topology, resolve_topology

_BUFFER_NUMBERS = itertools.count()

# Bounds every NCCL wait when the Buffer has no timeout of its own (torch's NCCL default).
DEFAULT_NCCL_TIMEOUT_S = 600.0


def resolve_device(device, backend: str) -> torch.device:
    if device is None:
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:  # e.g. a bare index on a machine with no accelerator
        raise ValueError(f"device: not a usable torch device: {device!r} ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested, but this torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} requested, but this torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not C.native_build_info()["cuda"]:
        raise ValueError(f"device: {device} needs moe_comm built with CUDA (nvcc found at build time); "
                         f"this build is CPU-only")
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("device: a CPU Buffer needs a gloo group; this group's backend is nccl")
    return device


class Buffer:
    """Binds dispatch/combine to a torch.distributed group.

    Rank r owns global experts [r * E_local, (r + 1) * E_local), E_local = num_experts / W.
    Collective: every rank of the group constructs its Buffer with the same arguments. With
    hierarchical forwarding, a timeout or a non-gloo group (combine_status needs a gloo one) it
    creates process groups with new_group, which every rank of the default group must enter:
    construct Buffers on all ranks, in the same order.

    hierarchical: "auto" forwards through one rank per node when the group spans several
    nodes; True forces it (on one node it is the same as flat); False always sends directly.

    device: where tokens live. None = the current CUDA device on an NCCL group, the CPU
    otherwise. On a CUDA device the tokens move over our own NCCL communicators (one per
    stage), bootstrapped over `group` whatever its backend; on the CPU over `group` (gloo).

    combine_status: every combine first agrees on an ok/error value with all ranks (a
    one-element all-reduce over gloo on the host, peer_status.py; no GPU synchronisation), so
    that a bad combine input on one rank makes every rank raise and the Buffer keeps working. False saves that small collective per
    combine: a bad combine input then raises on its rank only, and its peers end in the timeout.
    """

    def __init__(self, group=None, num_experts: int = 0, ranks_per_node: Optional[int] = None,
                 hierarchical="auto", timeout: Optional[float] = None, device=None,
                 combine_status: bool = True):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("moe_comm.Buffer needs torch.distributed to be initialised "
                               "(dist.init_process_group) before it is created")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if hierarchical not in ("auto", True, False):
            raise ValueError(f"hierarchical must be 'auto', True or False, got {hierarchical!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if not isinstance(combine_status, bool):
            raise TypeError(f"combine_status must be True or False, got {combine_status!r}")

        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group: must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        base = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(base)
        self.rank = dist.get_rank(base)
        if num_experts % self.world_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by the group size "
                             f"{self.world_size} (experts are split evenly across ranks)")
        self.device = resolve_device(device, dist.get_backend(base))  # before any group is made
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // self.world_size
        self.timeout = timeout
        self.group = base
        if timeout is not None:
            # A private group carries our own deadline; creating it is collective over the group.
            ranks = dist.get_process_group_ranks(base)
            self.group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout),
                                        backend=dist.get_backend(base))
        self.backend = dist.get_backend(self.group)
        self.topology: Topology = resolve_topology(self.group, self.world_size, self.rank, ranks_per_node)
        multi_node = self.topology.num_nodes > 1
        self.hierarchical = multi_node if hierarchical == "auto" else bool(hierarchical)
        if self.hierarchical and not multi_node:
            # One node: the node stage alone is the flat exchange; nothing to forward.
            self.hierarchical = False
        if self.hierarchical:
            self.stages: List[Stage] = hierarchical_stages(self.group, self.topology, self.experts_per_rank, timeout)
        else:
            self.stages = flat_stages(self.group, self.topology, self.experts_per_rank)
        self.status_group = None
        if combine_status and self.world_size > 1:
            self.status_group = self.group
            if self.backend != "gloo":  # a host collective: never an NCCL one
                self.status_group = new_gloo_group(dist.get_process_group_ranks(self.group), timeout)
        self.comm_stream = None
        if self.device.type == "cuda":
            # Collective: every rank of each stage joins its communicator, stage by stage.
            for stage in self.stages:
                if stage.size > 1:
                    stage.comm = create_nccl_communicator(stage.group, self.device,
                                                          timeout or DEFAULT_NCCL_TIMEOUT_S)
            self.comm_stream = torch.cuda.Stream(self.device)
        self._workspaces = {}
        # Every rank creates its Buffers in the same order (see above), so this numbering
        # agrees across ranks: the roll call of a failed collective uses it (roll_call.py).
        self.uid = next(_BUFFER_NUMBERS)
        self._collectives = collections.Counter()
        self.call = "none"  # the dispatch or combine under way, numbered per kind (roll_call.py)

    def begin_call(self, kind: str) -> None:
        """Numbers dispatch and combine calls in call order (the same on every rank)."""
        self.call = f"{kind}/{self.next_collective(kind)}"

    def next_collective(self, name: str) -> int:
        """Numbers this rank's collectives of one stage name, in call order."""
        self._collectives[name] += 1
        return self._collectives[name]

    @property
    def workspace_bytes(self) -> int:
        """Bytes held by this Buffer's reused wire buffers (see README: Memory)."""
        return sum(t.numel() for t in self._workspaces.values())

    def workspace(self, name: str, rows: int, row_bytes: int) -> torch.Tensor:
        """A uint8 [rows, row_bytes] scratch tensor for wire rows, reused across calls (grow-only):
        fresh multi-MB allocations page-fault on every call. Each stage uses its own name, and
        nothing returned to the caller aliases a workspace."""
        need = rows * row_bytes
        storage = self._workspaces.get(name)
        if storage is None or storage.numel() < need:
            storage = torch.empty(max(need, 1) + need // 4, dtype=torch.uint8, device=self.device)
            self._workspaces[name] = storage
        return storage[:need].view(rows, row_bytes)

    def __repr__(self) -> str:
        t = self.topology
        return (f"moe_comm.Buffer(rank={self.rank}, world_size={self.world_size}, "
                f"num_experts={self.num_experts}, nodes={t.num_nodes}x{t.ranks_per_node}, "
                f"backend={self.backend}, device={self.device}, hierarchical={self.hierarchical})")
