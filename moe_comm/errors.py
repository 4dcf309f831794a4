"""The errors of the engine's calls, raised alike on every rank: a problem the dispatch
headers agreed on (including a deferred combine status), a combine status agreed in-band, and
a failed exchange (CommError, naming
this rank, the stage and, from the roll call, the ranks that never arrived)."""

import torch

from ._native import C
from .roll_call import posted_reason
from .transport import comm_error
from .validation import ARGUMENT_CODES, routing_error

DISAGREEMENT = 4  # csrc/engine/header.h kDisagreement
STATIC_FLAG = 0x80  # header.h kStaticFlag: a problem a static-mode call kept on the device
EARLIER_COMBINE = 32  # csrc/engine/header.h kEarlierCombine (+ the combine argument code)
ARRIVAL_MISMATCH = 0x10  # header.h kArrivalMismatch: a rank's rows disagreed with its headers
FIELD_LABELS = {4: "x: hidden size", 5: "x: dtype and wire", 6: "topk_idx: k", 7: "num_experts",  # header.h Field
                8: "pad_to_capacity", 9: "the static mode's rows per peer (Buffer max_tokens_per_rank)"}
PAD_FIELD = 8  # its value: C + 1, or 0 without pad_to_capacity
DTYPE_FIELD = 5  # its value: the dtype's code, + 16 on an FP8 wire, + 32 pre-quantized (core/row_format.h)
DTYPE_NAMES = {0: "float32", 1: "bfloat16", 2: "float16"}


def _dtype_fact(value: int) -> str:
    if value & 32:
        return "pre-quantized float8_e4m3fn"
    name = DTYPE_NAMES.get(value & 15, f"code {value & 15}")
    return f"{name} sent as float8_e4m3fn" if value & 16 else name
COMBINE_ARGUMENTS = {1: "expert_y", 2: "topk_weights"}


def call_engine(buffer, method: str, *args):
    """buffer.engine.<method>(*args), its failed exchange turned into a CommError naming rank,
    stage and missing ranks. Once the Buffer has had an async call, on its worker thread behind
    the calls already queued (overlap.py), so that every rank makes them in the same order.
    (A plain call otherwise: this is on every dispatch's and combine's path.)"""
    worker = buffer.worker
    if worker is not None:
        stream = torch.cuda.current_stream(buffer.device) if buffer.device.type == "cuda" else None
        result, _ = worker.submit(lambda: call_engine_here(buffer, method, *args), stream).result()
        return result
    return call_engine_here(buffer, method, *args)


def call_engine_here(buffer, method: str, *args):
    """call_engine on the calling thread (the worker's own calls)."""
    engine = buffer.engine
    if engine is None:
        buffer.check_open()
    try:
        return getattr(engine, method)(*args)
    except C.NativeCommFailure as exc:
        stage, seq = engine.last_failure
        raise comm_error(buffer, buffer.stage_members(stage), stage, seq, exc) from exc


def dispatch_problem_error(buffer, problem, routing, rejected) -> Exception:
    code, bad_rank, seen_by, field, mine, theirs = problem
    if rejected is not None:
        return rejected.error
    if code & STATIC_FLAG:
        return static_problem_error(buffer, (buffer.world_size - bad_rank) << 8 | code)
    if bad_rank == buffer.rank and routing[0]:
        return routing_error(*routing, buffer.num_experts).error
    if code == DISAGREEMENT:
        if field >= 0:  # seen directly in a header this rank received
            if field == PAD_FIELD:
                mine, theirs = (f"C = {v - 1}" if v else "off" for v in (mine, theirs))
            elif field == DTYPE_FIELD:
                mine, theirs = (_dtype_fact(v) for v in (mine, theirs))
            return ValueError(f"{FIELD_LABELS[field]} is {mine} on rank {buffer.rank} but {theirs} on rank "
                              f"{bad_rank}: every rank of the group must agree")
        a, b = sorted((bad_rank, seen_by))
        return ValueError(f"dispatch: rank {a} and rank {b} disagree on the hidden size, dtype, top-k, "
                          f"num_experts or pad_to_capacity's C; every rank of the group must agree")
    if code == EARLIER_COMBINE + ARRIVAL_MISMATCH:
        return RuntimeError(f"dispatch: the rows an earlier dispatch delivered to rank {bad_rank} disagreed with its "
                            f"headers (a corrupted exchange); that dispatch's outputs on rank {bad_rank} are not "
                            f"valid; no tokens were exchanged in this dispatch")
    if code > EARLIER_COMBINE:
        argument = COMBINE_ARGUMENTS.get(code - EARLIER_COMBINE, code - EARLIER_COMBINE)
        reasons = (posted_reason(buffer, bad_rank, call) for call in reversed(buffer.combines_reported))
        reason = next((r for r in reasons if r), None)
        quoted = f" (rank {bad_rank} reported: {reason})" if reason else ""
        return RuntimeError(f"dispatch: an earlier combine failed: rank {bad_rank} rejected its argument "
                            f"'{argument}'{quoted}, so that combine's outputs are not valid on any rank "
                            f"(Buffer(combine_status='deferred') reports it here); no tokens were exchanged")
    return RuntimeError(f"dispatch: rank {bad_rank} rejected its argument '{ARGUMENT_CODES.get(code, code)}' "
                        f"(see that rank's error); no tokens were exchanged")


def static_problem_error(buffer, status: int) -> Exception:
    """A problem a static-mode dispatch found on the device, where it could not raise: that
    call's outputs were zeros on every rank. status: (world - bad rank) << 8 | STATIC_FLAG | code,
    as Buffer.check() or the next dispatch reports it."""
    bad_rank, code = buffer.world_size - (status >> 8), status & 0x7F
    if code == DISAGREEMENT:
        inner = ValueError(f"rank {bad_rank} disagreed with another rank on the hidden size, dtype, top-k, "
                           f"pad_to_capacity's C or max_tokens_per_rank; every rank of the group must agree")
    elif code == 2 and bad_rank == buffer.rank:
        inner = ValueError("topk_idx: a value outside [-1, num_experts) or an expert repeated in a row (found on "
                           "the device; run the call once without the static mode to find the slot)")
    else:
        inner = dispatch_problem_error(buffer, (code, bad_rank, bad_rank, -1, 0, 0), (0, 0, 0, 0), None)
    return type(inner)(f"static mode (max_tokens_per_rank, pad_to_capacity=True): a dispatch found on the device "
                       f"that {inner}; its outputs were zeros on every rank, and what was computed from them is not "
                       f"valid")


def agreed_combine_error(buffer, status: int) -> Exception:
    """status: (world - bad rank) << 8 | argument code, the MAX over ranks (the lowest bad rank)."""
    rank, code = buffer.world_size - (status >> 8), status & 0xFF
    reason = posted_reason(buffer, rank)
    quoted = f" (rank {rank} reported: {reason})" if reason else " (see that rank's error)"
    return RuntimeError(f"combine: rank {rank} rejected its argument '{COMBINE_ARGUMENTS.get(code, code)}'; "
                        f"nothing was combined{quoted}")
