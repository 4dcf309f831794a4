"""Input checks run on the calling rank before any token moves.

Each check returns None or an exception naming the argument and the rule it broke; dispatch
still joins the first (fixed-size) exchange carrying an error code, so that every rank raises
instead of some ranks waiting for a peer that gave up.

The values of topk_idx (range, repeats) are checked where they live, by the engine's send plan
(csrc/kernels/bodies/layout.h), into dispatch's header: no extra host synchronisation; the
rank whose routing is bad then names the slot (`routing_error`).
"""

import math
from typing import Optional

import torch

from ._native import C

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Header status codes of dispatch's arguments (4 is a disagreement: csrc/engine/header.h).
ARGUMENT_CODES = {0: None, 1: "x", 2: "topk_idx", 3: "topk_weights", 5: "capacity_factor", 6: "drop_policy",
                  7: "expert_alignment", 8: "pad_to_capacity", 9: "wire_dtype"}
FP8 = torch.float8_e4m3fn
FP8_BLOCK = 128  # elements per scale (fp8.py)
DROP_POLICIES = ("probs", "position")
CODE_OF = {name: code for code, name in ARGUMENT_CODES.items() if name}


class InputError(Exception):
    """A rejected argument: `argument` is its name, `error` the exception to raise."""

    def __init__(self, argument: str, error: Exception):
        super().__init__(str(error))
        self.argument = argument
        self.error = error


def _type_error(argument: str, msg: str) -> InputError:
    return InputError(argument, TypeError(f"{argument}: {msg}"))


def _value_error(argument: str, msg: str) -> InputError:
    return InputError(argument, ValueError(f"{argument}: {msg}"))


def _check_device(argument: str, t: torch.Tensor, device: torch.device) -> Optional[InputError]:
    if t.device != device:
        return _value_error(argument, f"must be on the Buffer's device {device}, got {t.device}")
    return None


def _check_weights(topk_weights, shape: tuple, device: torch.device, rule: str) -> Optional[InputError]:
    if not isinstance(topk_weights, torch.Tensor):
        return _type_error("topk_weights", f"must be a torch.Tensor or None, got {type(topk_weights).__name__}")
    if topk_weights.dtype != torch.float32:
        return _type_error("topk_weights", f"dtype must be float32, got {topk_weights.dtype}")
    if tuple(topk_weights.shape) != shape:
        return _value_error("topk_weights", f"must be {list(shape)}, {rule}; got {tuple(topk_weights.shape)}")
    return _check_device("topk_weights", topk_weights, device)


def fp8_parts(x):
    """dispatch's x -> (the token rows, their FP8 scales or None): a pair (x_fp8, x_scales) is
    pre-quantized input (API.md: FP8 on the wire)."""
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return x[0], x[1]
    return x, None


def check_wire(x, wire_dtype, device: torch.device) -> Optional[InputError]:
    """dispatch's wire_dtype, and a pre-quantized x's two parts."""
    rows, scales = fp8_parts(x)
    if wire_dtype is not None and wire_dtype != FP8:
        return _value_error("wire_dtype", f"must be None (rows in x's dtype) or torch.float8_e4m3fn, got {wire_dtype!r}")
    if isinstance(x, (tuple, list)) and len(x) != 2:
        return _type_error("x", f"a tuple x must be the pair (x_fp8, x_scales), got {len(x)} items")
    if scales is None:
        if isinstance(rows, torch.Tensor) and rows.dtype == FP8:
            return _type_error("x", "a float8_e4m3fn x needs its scales: pass the pair (x_fp8, x_scales), e.g. "
                                    "moe_comm.quantize_fp8(x), or x in its own dtype with wire_dtype=torch.float8_e4m3fn")
        return None
    if not isinstance(rows, torch.Tensor) or rows.dtype != FP8 or rows.dim() != 2:
        got = f"{rows.dtype} of shape {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        return _type_error("x", f"x_fp8 of the pair (x_fp8, x_scales) must be a 2-D float8_e4m3fn tensor [tokens, "
                                f"hidden], got {got}")
    problem = _check_device("x", rows, device)
    if problem:
        return problem
    expected = (rows.shape[0], -(-rows.shape[1] // FP8_BLOCK))
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
        got = f"{scales.dtype} of shape {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        return _value_error("x", f"x_scales of the pair (x_fp8, x_scales) must be float32 [tokens, ceil(hidden / 128)] "
                                 f"= {list(expected)}, got {got}")
    return _check_device("x", scales, device)


def check_dispatch_inputs(x, topk_idx, topk_weights, device: torch.device, wire_dtype=None) -> Optional[InputError]:
    """Types, shapes and devices (host facts). The index values: the engine's send plan."""
    problem = check_wire(x, wire_dtype, device)
    if problem:
        return problem
    x, scales = fp8_parts(x)
    if not isinstance(x, torch.Tensor):
        return _type_error("x", f"must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES and scales is None:
        return _type_error("x", f"dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        return _value_error("x", f"must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    problem = _check_device("x", x, device)
    if problem:
        return problem
    if not isinstance(topk_idx, torch.Tensor):
        return _type_error("topk_idx", f"must be a torch.Tensor, got {type(topk_idx).__name__}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        return _type_error("topk_idx", f"dtype must be int64 or int32, got {topk_idx.dtype}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        return _value_error("topk_idx", f"must be [tokens, k] = [{x.shape[0]}, k], "
                                        f"got shape {tuple(topk_idx.shape)}")
    if topk_idx.shape[1] == 0:
        return _value_error("topk_idx", "must have at least one slot per token (k >= 1); mark unused slots "
                                        "with -1")
    problem = _check_device("topk_idx", topk_idx, device)
    if problem:
        return problem
    if topk_weights is not None:
        problem = _check_weights(topk_weights, tuple(topk_idx.shape), device, "the shape of topk_idx")
        if problem:
            return problem
    return None


MAX_ROWS = 2 ** 40  # bounds C and the alignment: the engine's row arithmetic stays in int64


def check_capacity_arguments(capacity_factor, drop_policy, topk_weights, expert_alignment,
                             pad_to_capacity, tokens: int, topk: int, num_experts: int) -> Optional[InputError]:
    """dispatch's capacity and padding arguments (host facts); None when fine. tokens: T for C."""
    if not isinstance(pad_to_capacity, bool):
        return _type_error("pad_to_capacity", f"must be True or False, got {type(pad_to_capacity).__name__}")
    if pad_to_capacity and capacity_factor is None:
        return _value_error("pad_to_capacity", "pads every (expert, source rank) block to the capacity C, "
                                               "which needs a capacity_factor")
    if isinstance(expert_alignment, bool) or not isinstance(expert_alignment, int):
        return _type_error("expert_alignment", f"must be an int, got {type(expert_alignment).__name__}")
    if not 1 <= expert_alignment <= MAX_ROWS:
        return _value_error("expert_alignment", f"must be in [1, 2**40], got {expert_alignment}")
    if drop_policy not in DROP_POLICIES:
        return _value_error("drop_policy", f"must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        return _type_error("capacity_factor", f"must be a number or None, got {type(capacity_factor).__name__}")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        return _value_error("capacity_factor", f"must be a finite number > 0, got {capacity_factor!r}")
    if expert_capacity(capacity_factor, tokens, topk, num_experts) > MAX_ROWS:
        return _value_error("capacity_factor", f"{capacity_factor!r} gives a capacity over 2**40 rows")
    if drop_policy == "probs" and topk_weights is None:
        return _value_error("drop_policy", "'probs' keeps the largest topk_weights, and none were given; "
                                           "pass topk_weights or drop_policy='position'")
    return None


def check_token_budget(x, max_tokens_per_rank: Optional[int]) -> Optional[InputError]:
    """x's tokens within the Buffer's max_tokens_per_rank."""
    if max_tokens_per_rank is not None and x.shape[0] > max_tokens_per_rank:
        return _value_error("x", f"has {x.shape[0]} tokens, more than the Buffer's max_tokens_per_rank "
                                 f"{max_tokens_per_rank}")
    return None


def expert_capacity(capacity_factor: float, tokens: int, topk: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * tokens * topk / num_experts): the (token, expert) pairs of this
    rank each expert keeps (API.md: Capacity; tokens: the Buffer's max_tokens_per_rank when it
    has one, else the rank's own)."""
    return math.ceil(capacity_factor * tokens * topk / num_experts)


def routing_error(kind: int, token: int, slot: int, value: int, num_experts: int) -> Optional[InputError]:
    """The error of a broken rule of topk_idx (core/layout.h RoutingProblem: kind 1 out of
    range, 2 a repeated expert), naming the slot; None for kind 0."""
    if kind == 1:
        return _value_error("topk_idx", f"topk_idx[{token}, {slot}] = {value} is out of range "
                                        f"[-1, {num_experts}) (num_experts = {num_experts})")
    if kind == 2:
        return _value_error("topk_idx", f"expert {value} appears twice in row {token} "
                                        f"(again at slot {slot}); an expert may not repeat in a row")
    return None


def check_combine_inputs(expert_y, topk_weights, handle) -> Optional[InputError]:
    if not isinstance(expert_y, torch.Tensor):
        return _type_error("expert_y", f"must be a torch.Tensor, got {type(expert_y).__name__}")
    if expert_y.dtype != handle.dtype:
        made = " (the combine dtype of a pre-quantized FP8 dispatch)" if handle.prequantized else ""
        return _type_error("expert_y", f"dtype must match the dispatched x ({handle.dtype}{made}), "
                                       f"got {expert_y.dtype}")
    expected = (handle.num_recv_rows, handle.hidden)
    if tuple(expert_y.shape) != expected:
        return _value_error("expert_y", f"must be [R, H] = {list(expected)} in the row order of recv_x, "
                                        f"got shape {tuple(expert_y.shape)}")
    problem = _check_device("expert_y", expert_y, handle.device)
    if problem:
        return problem
    if topk_weights is not None:
        return _check_weights(topk_weights, (handle.num_tokens, handle.topk), handle.device,
                              "[T, K] as at dispatch")
    return None
