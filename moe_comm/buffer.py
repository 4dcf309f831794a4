"""Buffer: the expert-parallel group, its expert placement, topology and transport."""

import atexit
import collections
import weakref
from typing import List, Optional

import torch
import torch.distributed as dist

from ._native import C
from .errors import call_engine, static_problem_error
from .nccl_comm import create_nccl_communicator
from .overlap import InOrder
from .library import register_buffer
from .groups import buffer_key, connect_gloo_group, default_store, roll_call_store
from .shared_memory import network_namespaces, shared_memory_token
from .stages import Stage, flat_stages, hierarchical_stages
from .streams import stream_of
from .topology import Topology, resolve_topology
from .transport import SIGN_AFTER_S

# Bounds every collective of a Buffer made without a timeout: torch's NCCL default, long
# enough for a slow first step, short enough that a dead peer does not cost gloo's 30 minutes.
DEFAULT_TIMEOUT_S = 600.0

CPU_TRANSPORTS = ("auto", "shm", "gloo")  # see Buffer: cpu_transport

# Buffers not closed yet; closed at interpreter exit while torch is still whole (Buffer.close).
_OPEN_BUFFERS = weakref.WeakSet()


@atexit.register
def _close_open_buffers() -> None:
    for buffer in list(_OPEN_BUFFERS):
        buffer.close()


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
    Collective over `group` only: every rank of the group constructs its Buffer with the same
    arguments, and the Buffers of one group in the same order on each of its ranks. Ranks
    outside the group take no part (a DP x EP job builds each EP group's Buffers on that
    group alone). The Buffer connects gloo groups of its own (groups.py), never via new_group.

    timeout: seconds that bound every collective of the Buffer (default DEFAULT_TIMEOUT_S,
    600); a peer that does not arrive ends in moe_comm.CommError naming rank and stage.

    hierarchical: "auto" forwards through one rank per node when the group spans several
    nodes; True forces it (on one node it is the same as flat); False always sends directly.

    device: where tokens live. None = the current CUDA device on an NCCL group, the CPU
    otherwise. On a CUDA device the tokens move over our own NCCL communicators (one per
    stage), bootstrapped over our gloo groups whatever `group`'s backend; on the CPU over our
    gloo groups. Use it as a context manager or call close() before destroy_process_group.

    cpu_transport: how a CPU Buffer's rows move. "shm": through shared memory (every rank on
    one host, csrc/cpu/shm_transport); "gloo": over the Buffer's gloo groups (any hosts);
    "auto" (default): shm for each stage whose ranks see rank 0's /dev/shm and share a network
    namespace, gloo for the others (ranks in different network namespaces stand for different
    nodes: bench/cluster.py's emulated cluster). buf.cpu_transport says which was chosen: "shm",
    "gloo", or "shm+gloo" (the intra-node stage on shm, the stages across nodes on gloo).

    combine_status: how a bad combine input on one rank reaches the others, so that every rank
    raises and the Buffer keeps working. The status travels in-band either way, one int64 per
    peer in combine's own first exchange (no extra collective).
      "immediate": every rank raises in that combine call. Free on the CPU; on CUDA one host
        wait per combine (the status is read back before the call returns).
      "deferred": the combine returns on the good ranks (their result is not valid), and the
        next dispatch raises on every rank, naming the rank and the argument, before any token
        moves. No host wait: CUDA combine stays asynchronous.
      True (default): "immediate" on the CPU, "deferred" on CUDA.
      False: no status: a bad combine input raises on its rank only, and its peers end in the
        timeout.
    buf.combine_status says which was chosen ("immediate", "deferred" or None).

    max_tokens_per_rank: the most tokens a dispatch may get on any rank (more: an error naming x
    on every rank); a capacity C is then computed from it instead of each rank's own count, so
    every rank gets the same C (pad_to_capacity needs that).
    """

    def __init__(self, group=None, num_experts: int = 0, ranks_per_node: Optional[int] = None,
                 hierarchical="auto", timeout: Optional[float] = None, device=None,
                 combine_status=True, cpu_transport: str = "auto", max_tokens_per_rank: Optional[int] = None):
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
        if not (isinstance(combine_status, bool) or combine_status in ("immediate", "deferred")):
            raise ValueError(f"combine_status must be True, False, 'immediate' or 'deferred', got {combine_status!r}")
        if max_tokens_per_rank is not None and (isinstance(max_tokens_per_rank, bool)
                                                or not isinstance(max_tokens_per_rank, int)
                                                or not 0 <= max_tokens_per_rank <= 2 ** 40):
            raise ValueError(f"max_tokens_per_rank must be an int in [0, 2**40] or None, got {max_tokens_per_rank!r}")
        if cpu_transport not in CPU_TRANSPORTS:
            raise ValueError(f"cpu_transport must be one of {CPU_TRANSPORTS}, got {cpu_transport!r}")

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
        self.timeout = float(timeout) if timeout is not None else DEFAULT_TIMEOUT_S
        self.group = base  # the user's group: for the caller's own collectives (nn.py, reference)
        self.backend = dist.get_backend(base)
        self.topology: Topology = resolve_topology(base, self.world_size, self.rank, ranks_per_node)
        multi_node = self.topology.num_nodes > 1
        self.hierarchical = multi_node if hierarchical == "auto" else bool(hierarchical)
        if self.hierarchical and not multi_node:
            # One node: the node stage alone is the flat exchange; nothing to forward.
            self.hierarchical = False
        default_ranks = dist.get_process_group_ranks(base)
        # Numbered per rank list, so the members of this group name it alike (groups.py); the
        # roll call of a failed collective keys its store entries by it too.
        self.uid = buffer_key(default_ranks)
        roll_call_store()  # its own store connection, made while the network is healthy (roll_call.py)
        self._closed = False
        # Our own gloo groups, connected by this group's ranks alone, carrying our timeout:
        # "all" (flat rows and headers on CPU, combine's status, NCCL bootstrap), and in the
        # hierarchical mode this rank's rail and node groups.
        self.all_ranks_group = None
        if self.world_size > 1:
            self.all_ranks_group = connect_gloo_group(self.uid, "all", default_ranks, self.timeout)
        if self.hierarchical:
            self.stages: List[Stage] = hierarchical_stages(self.uid, default_ranks, self.topology,
                                                           self.experts_per_rank, self.timeout)
        else:
            self.stages = flat_stages(self.all_ranks_group, self.topology, self.experts_per_rank)
        if combine_status is True:
            combine_status = "deferred" if self.device.type == "cuda" else "immediate"
        self.combine_status = combine_status or None
        self.max_tokens_per_rank = max_tokens_per_rank
        if self.device.type == "cuda":
            # Collective: every rank of each stage joins its communicator, stage by stage.
            for stage in self.stages:
                if stage.size > 1:
                    stage.comm = create_nccl_communicator(stage.group, self.device, self.timeout)
        self.cpu_transport = self._choose_cpu_transport(cpu_transport)
        self.engine = C.Engine(self._engine_stages(), self.rank, self.world_size, num_experts, default_store(),
                               self.uid, min(SIGN_AFTER_S, self.timeout / 4),
                               self.device.index if self.device.type == "cuda" else -1, self.timeout)
        self.engine.set_combine_status_deferred(self.combine_status == "deferred")
        self._collectives = collections.Counter()
        self.call = "none"  # the dispatch or combine under way, numbered per kind (roll_call.py)
        self.combines_pending, self.combines_reported = collections.deque(maxlen=16), []
        self.worker: Optional[InOrder] = None  # made by the first async call (overlap.py)
        self.op_key = register_buffer(self)  # how the torch ops name it (library.py)
        _OPEN_BUFFERS.add(self)

    def _choose_cpu_transport(self, wanted: str) -> Optional[str]:
        """"shm", "gloo", or None (a CUDA Buffer, or a single rank). Collective over the group."""
        self._shm_token, self._shm_stages = None, set()
        if self.device.type != "cpu" or self.world_size == 1 or wanted == "gloo":
            return "gloo" if self.device.type == "cpu" and self.world_size > 1 else None
        self._shm_token = shared_memory_token(self.all_ranks_group)
        if self._shm_token is None and wanted == "shm":
            raise RuntimeError("cpu_transport='shm': the ranks of this group do not share /dev/shm (several hosts "
                               "or containers); use cpu_transport='gloo' or 'auto'")
        if self._shm_token is None:
            return "gloo"
        self._shm_stages = {stage.name for stage in self.stages}
        if wanted == "auto":  # a network namespace is a node's boundary: its rows cross the network
            spaces = network_namespaces(self.all_ranks_group)  # by Buffer rank: the group is all ranks
            self._shm_stages = {stage.name for stage in self.stages
                                if len({spaces[r] for r in stage.global_ranks}) == 1}
        on_shm = [stage.name in self._shm_stages for stage in self.stages if stage.size > 1]
        return "shm" if all(on_shm) else "gloo" if not any(on_shm) else "shm+gloo"

    def _engine_stages(self) -> list:
        """The stages as the engine takes them: name, size, index, experts per destination,
        Buffer ranks, which destinations are on another node, and the gloo group."""
        topo = self.topology
        return [(stage.name, stage.size, stage.index, stage.experts_per_dest, stage.global_ranks,
                 [stage.crosses_nodes and topo.node_of(r) != topo.node for r in stage.global_ranks],
                 (stage.comm if self.device.type == "cuda" else stage.group._get_backend(torch.device("cpu")))
                 if stage.size > 1 else None, self._shm_token if stage.name in self._shm_stages else None)
                for stage in self.stages]

    def stage_members(self, stage_name: str) -> List[int]:
        """The Buffer ranks of the stage an exchange name ("dispatch/flat/header") belongs to."""
        parts = stage_name.split("/")
        for stage in self.stages:
            if len(parts) > 1 and parts[1] == stage.name:
                return stage.global_ranks
        return list(range(self.world_size))

    @property
    def counters(self) -> dict:
        """Events of the last call of each kind (dispatch, combine, dispatch_backward,
        combine_backward), counted by the engine: launches (device-work calls, one kernel each
        on CUDA), exchanges (one NCCL group each), host_waits, host_collectives. README: Engine."""
        if self.engine is None:
            return {}
        return {kind: self.engine.counters(kind)
                for kind in ("dispatch", "combine", "dispatch_backward", "combine_backward")}

    def close(self) -> None:
        """Releases the Buffer's process groups, NCCL communicators and wire buffers. Local (no
        peer takes part) and idempotent; the Buffer is unusable afterwards. Call it (or use the
        Buffer as a context manager) before `dist.destroy_process_group()`; Buffers still open
        at interpreter exit are closed by an exit hook, while the interpreter is still whole."""
        if self._closed:
            return
        self._closed = True
        _OPEN_BUFFERS.discard(self)
        if self.worker is not None:  # the calls in flight end first (or time out)
            self.worker.close()
            self.worker = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # in-flight exchanges drain first
        for stage in self.stages:
            stage.comm = None  # the communicator's destructor drains its watchdog
            stage.group = None
        self.stages = []
        self.all_ranks_group = None
        if self.engine is not None:
            self.engine.close()  # its transports hold the gloo groups
        self.engine = None

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError("buffer: this moe_comm.Buffer was closed; create a new one")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def begin_call(self, kind: str) -> None:
        """Numbers dispatch and combine calls in call order (the same on every rank)."""
        self.check_open()
        self.call = f"{kind}/{self.next_collective(kind)}"
        # A deferred combine status is reported by the next dispatch: the combines it covers,
        # for the error to quote the bad rank's reason (posted under its combine call).
        if kind == "dispatch":
            self.combines_reported, self.combines_pending = list(self.combines_pending), collections.deque(maxlen=16)
        else:
            self.combines_pending.append(self.call)

    def in_order(self) -> InOrder:
        """The worker thread async calls run on (made on first use); every later call of this
        Buffer queues there too, in order."""
        self.check_open()
        if self.worker is None:
            self.worker = InOrder(f"moe_comm-{self.uid}")
        return self.worker

    def next_collective(self, name: str) -> int:
        """Numbers this rank's collectives of one stage name, in call order."""
        self._collectives[name] += 1
        return self._collectives[name]

    def static_tokens(self, pad_to_capacity) -> int:
        """The token budget a dispatch runs the static mode with (0: not static): a flat Buffer
        with max_tokens_per_rank, and pad_to_capacity=True (README: Static mode)."""
        if pad_to_capacity is not True or self.hierarchical or not self.max_tokens_per_rank:
            return 0
        return self.max_tokens_per_rank

    def check(self) -> None:
        """Raises, on every rank, a problem the static mode (or a deferred combine status) kept
        on the device instead of waiting for it: a rank's bad input, ranks that disagree. The
        calls it concerns gave zeros. Collective over the group: every rank calls it at the same
        point (outside a CUDA graph capture; one host wait and one small exchange). Clears it."""
        self.check_open()
        status = call_engine(self, "agree_status", stream_of(self.device))
        if status:
            raise static_problem_error(self, status)

    @property
    def workspace_bytes(self) -> int:
        """Bytes held by this Buffer's reused wire buffers (see README: Memory)."""
        return self.engine.workspace_bytes if self.engine is not None else 0

    def __repr__(self) -> str:
        t = self.topology
        return (f"moe_comm.Buffer(rank={self.rank}, world_size={self.world_size}, "
                f"num_experts={self.num_experts}, nodes={t.num_nodes}x{t.ranks_per_node}, "
                f"backend={self.backend}, device={self.device}, hierarchical={self.hierarchical})")
