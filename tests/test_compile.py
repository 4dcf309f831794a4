"""torch.compile (README: torch.compile): dispatch, combine and their backwards are torch custom
ops that pass torch.library.opcheck; a hand-written layer and moe_comm.nn.MoELayer compile with
fullgraph=True (no graph break) and give eager's outputs and gradients, flat, hierarchical, with
capacity and in the static mode; activation checkpointing works eagerly and compiled, and the
save_exchanges policy keeps the exchanges from running again; the example trains the same."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_comm
from moe_comm import library
from moe_comm.experts import grouped_mm, grouped_mm_weight_grad
from moe_comm.nn import MoELayer
from moe_comm.routing import node_limited_select
from tests.cases import Case, make_inputs
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _inputs(rank, world_size, E, dtype="bfloat16", hidden=9, seed=0, tokens=(6, 0, 9, 3)):
    case = Case(world_size, E, 3, hidden, dtype, "masked", tokens, seed=seed)
    x, idx, w = make_inputs(case, rank)
    return x.requires_grad_(True), idx, w.requires_grad_(True)


def _layer(x, idx, w, buf, kwargs):
    """A hand-written MoE layer: its 'experts' use the router weights too."""
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf, **kwargs)
    expert_y = (recv_x.float() * 1.5 + recv_w[:, None]).to(x.dtype)
    return moe_comm.combine(expert_y, handle, w), counts


def _grads(fn, x, idx, w):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y, counts = fn(x, idx, w)
    y.float().square().sum().backward()
    return y.detach(), counts, x.grad, w.grad


def _opcheck(op, args, tests=ALL_TESTS):
    result = torch.library.opcheck(op, args, test_utils=tests)
    assert set(result.values()) == {"SUCCESS"}, (op, result)


def _opcheck_worker(rank, world_size, ranks_per_node):
    E = max(4, 2 * world_size)
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node, timeout=120)
    x, idx, w = _inputs(rank, world_size, E)
    T = x.shape[0]
    args = (x, None, idx, w, buf.op_key, None, "probs", 1, False, "")
    # Every dispatch returns a new token, so "the same call twice gives equal outputs" cannot
    # hold for it: opcheck's AOT test is replaced by compiling the op and comparing the rest.
    _opcheck(torch.ops.moe_comm.dispatch.default, args, ALL_TESTS[:3])
    # FP8 rows: quantized in the pack, and pre-quantized (x_fp8, x_scales). torch's own test code
    # cannot take every float8 input (its schema test multiplies the inputs; its input clone
    # fails on an empty one): no schema test, and a token on every rank for the pre-quantized.
    _opcheck(torch.ops.moe_comm.dispatch.default, args[:-1] + (str(torch.float8_e4m3fn),), ALL_TESTS[:3])
    xq, idxq, wq = _inputs(rank, world_size, E, tokens=(6, 2, 9, 3))
    _opcheck(torch.ops.moe_comm.dispatch.default,
             (*moe_comm.quantize_fp8(xq.detach()), idxq, wq, buf.op_key, None, "probs", 1, False, ""), ALL_TESTS[1:3])

    def dispatch_outputs(x, w):
        recv_x, _, recv_w, counts, _token, dropped = library.dispatch_op(x, None, idx, w, buf.op_key, None, "probs", 1,
                                                                        False, "")
        return recv_x, recv_w, counts, dropped

    for fn in (dispatch_outputs, torch.compile(dispatch_outputs, backend="aot_eager", fullgraph=True, dynamic=True)):
        xc, wc = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        outs = fn(xc, wc)
        (outs[0].float().sum() * 3 + outs[1].square().sum()).backward()
        if fn is dispatch_outputs:
            expected = outs + (xc.grad, wc.grad)
        else:
            for got, want in zip(outs + (xc.grad, wc.grad), expected):
                assert torch.equal(got, want)

    recv_x, _, recv_w, counts, token, _ = library.dispatch_op(*args)
    expert_y = torch.randn(recv_x.shape, dtype=recv_x.dtype).requires_grad_(True)
    fresh_w = torch.rand(w.shape).requires_grad_(True)
    for weights, reuse in ((w, True), (fresh_w, False), (None, False)):
        _opcheck(torch.ops.moe_comm.combine.default, (expert_y, token, weights, T, reuse))
    _opcheck(torch.ops.moe_comm.dispatch_backward.default, (torch.randn(recv_x.shape, dtype=recv_x.dtype),
                                                            torch.randn(recv_w.shape), token, T, 3))
    _opcheck(torch.ops.moe_comm.dispatch_backward.default, (torch.randn(recv_x.shape, dtype=recv_x.dtype), None,
                                                            token, T, 3))
    _, slot_weights = library.combine_op(expert_y.detach(), token, w.detach(), T, True)
    for slot, ey in ((slot_weights, expert_y.detach()), (slot_weights, None), (None, None)):
        _opcheck(torch.ops.moe_comm.combine_backward.default,
                 (torch.randn((T, x.shape[1]), dtype=x.dtype), token, slot, ey, recv_x.shape[0], 3))
    buf.close()
    return recv_x.shape[0]


@pytest.mark.parametrize("world_size, ranks_per_node", [(1, None), (2, None), (4, 2)])
def test_opcheck_every_communication_op(world_size, ranks_per_node):
    rows = run_distributed(world_size, _opcheck_worker, ranks_per_node, timeout=600)
    assert len(rows) == world_size


def test_opcheck_local_ops():
    scores = torch.randn(7, 8)
    _opcheck(torch.ops.moe_comm.node_limited_select.default, (scores.sigmoid(), scores, None, 3, 4, 2, 1))
    _opcheck(torch.ops.moe_comm.node_limited_select.default, (scores.sigmoid(), scores, torch.randn(8), 3, 4, 2, 1))
    for counts in ([3, 0, 4], [0, 0, 0], [7, 0, 0]):
        tokens = torch.tensor(counts)
        rows = torch.randn(sum(counts), 5, requires_grad=True)
        weights = torch.randn(3, 5, 6, requires_grad=True)
        _opcheck(torch.ops.moe_comm.grouped_mm.default, (rows, weights, tokens))
        _opcheck(torch.ops.moe_comm.grouped_mm_weight_grad.default,
                 (rows.detach(), torch.randn(sum(counts), 6), tokens))
        # Equal, bit for bit, to a loop over the experts, gradients included.
        out = grouped_mm(rows, weights, tokens)
        g = torch.randn(out.shape)
        out.backward(g)
        parts = rows.detach().split(counts)
        want = torch.cat([p @ weights[e].detach() for e, p in enumerate(parts)])
        assert torch.equal(out.detach(), want)
        assert torch.equal(rows.grad, torch.cat([gp @ weights[e].detach().T for e, gp in enumerate(g.split(counts))]))
        assert torch.equal(weights.grad, grouped_mm_weight_grad(rows.detach(), g, tokens))
    with pytest.raises(ValueError, match="scores: contains NaN"):
        node_limited_select(scores.sigmoid(), scores.clone().fill_(float("nan")), None, 3, 4, 2, 1)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        grouped_mm(torch.randn(3, 5), torch.randn(3, 5, 6), torch.tensor([[3]]))


def _op_errors_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, timeout=60)
    x, idx, w = _inputs(rank, world_size, 4, tokens=(5,))
    seen = []
    for bad_shape in (False, True):
        recv_x, _, _, _, token, _ = library.dispatch_op(x, None, idx, w, buf.op_key, None, "probs", 1, False, "")
        expert_y = recv_x
        if rank == 1:  # dispatch's weights changed since (in place), and perhaps expert_y's shape too
            with torch.no_grad():
                w.mul_(1)
            expert_y = recv_x[1:] if bad_shape else recv_x
        with pytest.raises((ValueError, RuntimeError)) as error:
            library.combine_op(expert_y, token, w, x.shape[0], True)
        seen.append(str(error.value))
        w = w.detach().clone().requires_grad_(True)
    # The Buffer still works.
    recv_x, _, _, _, token, _ = library.dispatch_op(x, None, idx, w, buf.op_key, None, "probs", 1, False, "")
    y, _ = library.combine_op(recv_x, token, w, x.shape[0], True)
    buf.close()
    return seen


def test_op_path_errors_raise_on_every_rank():
    first, second = run_distributed(2, _op_errors_worker, timeout=300)
    assert "rank 1 rejected its argument 'topk_weights'" in first[0] and "modified in place" in second[0]
    assert "rank 1 rejected its argument 'expert_y'" in first[1] and "expert_y: must be [R, H]" in second[1]


MODES = {
    "plain": ({}, {}),
    "capacity": ({}, {"capacity_factor": 1.0, "drop_policy": "probs", "expert_alignment": 4}),
    "padded": ({}, {"capacity_factor": 1.5, "pad_to_capacity": True, "drop_policy": "position"}),
    "static": ({"max_tokens_per_rank": 9}, {"capacity_factor": 2.0, "pad_to_capacity": True}),
}


def _compiled_layer_worker(rank, world_size, ranks_per_node, mode):
    buffer_kwargs, kwargs = MODES[mode]
    E = max(4, 2 * world_size)
    tokens = (6, 0, 9, 3) if mode != "padded" else (6,)  # padded without a budget: the same T everywhere
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node, timeout=120, **buffer_kwargs)
    counters.clear()
    torch._dynamo.reset()

    def eager(x, idx, w):
        return _layer(x, idx, w, buf, kwargs)
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    for seed in (0, 1):  # a second routing (and token count) through the same compiled code
        x, idx, w = _inputs(rank, world_size, E, seed=seed, tokens=tokens if seed == 0 else tokens[::-1])
        want, got = _grads(eager, x, idx, w), _grads(compiled, x, idx, w)
        for a, b in zip(got, want):
            assert torch.equal(a, b), mode
    assert not counters["graph_break"], dict(counters["graph_break"])

    # What the compiler is told: R exact where every shape is fixed, else a size it cannot know.
    x, idx, w = _inputs(rank, world_size, E)
    with FakeTensorMode(shape_env=ShapeEnv()) as fake:
        fx, fidx, fw = fake.from_tensor(x), fake.from_tensor(idx), fake.from_tensor(w)
        recv_x, recv_w, counts, handle = moe_comm.dispatch(fx, fidx, fw, buf, **kwargs)
        y = moe_comm.combine(recv_x, handle, fw)
    assert isinstance(handle, library.OpHandle) and tuple(y.shape) == tuple(x.shape)
    fixed = library.fixed_recv_rows(buf, 3, kwargs.get("capacity_factor"), kwargs.get("expert_alignment", 1),
                                    kwargs.get("pad_to_capacity", False))
    assert (fixed is not None) == (mode == "static")
    assert recv_x.shape[0] == fixed if fixed is not None else isinstance(recv_x.shape[0], torch.SymInt)
    assert counts.device == (x.device if mode == "static" else torch.device("cpu"))
    buf.close()


@pytest.mark.parametrize("world_size, ranks_per_node, mode", [
    (2, None, "plain"), (4, 2, "plain"), (2, None, "capacity"), (2, None, "padded"), (2, None, "static"),
    (1, None, "plain"),
])
def test_compiled_layer_equals_eager(world_size, ranks_per_node, mode):
    run_distributed(world_size, _compiled_layer_worker, ranks_per_node, mode, timeout=600)


def _moe_layer(buf, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MoELayer(8, 12, buf.num_experts, 2, buf, aux_loss_coef=0.01, **kwargs)


def _layer_grads(layer, call, x, aux_loss=True):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = call(x)
    (y.square().sum() + (layer.aux_loss if aux_loss else 0)).backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


def _close(got, want, what=""):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} item {i}: {m}")


def _moe_layer_worker(rank, world_size, ranks_per_node, layer_kwargs):
    buf = moe_comm.Buffer(num_experts=max(4, 2 * world_size), ranks_per_node=ranks_per_node, timeout=120,
                          max_tokens_per_rank=16 if layer_kwargs.get("pad_to_capacity") else None)
    layer = _moe_layer(buf, **layer_kwargs)
    x = torch.randn(16 if layer_kwargs.get("pad_to_capacity") else [5, 0, 8, 3][rank], 8,
                    generator=torch.Generator().manual_seed(rank))
    counters.clear()
    torch._dynamo.reset()
    want = _layer_grads(layer, layer, x)
    compiled = torch.compile(layer, fullgraph=True)  # inductor, the default
    _close(_layer_grads(layer, compiled, x), want)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert layer.last_load.sum() > 0 and 0.0 <= layer.drop_rate <= 1.0
    with torch.inference_mode():  # inference tensors have no version: combine cannot check them
        _close([compiled(x)], [layer(x)])
    buf.close()


@pytest.mark.parametrize("world_size, ranks_per_node, layer_kwargs", [
    (2, None, {}), (4, 2, {"max_nodes": 1, "capacity_factor": 1.0}),
    (2, None, {"capacity_factor": 2.0, "pad_to_capacity": True}),
])
def test_compiled_moe_layer_equals_eager(world_size, ranks_per_node, layer_kwargs):
    run_distributed(world_size, _moe_layer_worker, ranks_per_node, layer_kwargs, timeout=600)


def _routed_experts(layer, x):
    """MoELayer's computation as a plain function (no module state set: nothing for a compiled
    checkpoint to replay)."""
    idx, weights, _ = layer.route(x)
    recv_x, _, counts, handle = moe_comm.dispatch(x, idx, weights, layer.buffer)
    return moe_comm.combine(layer.run_experts(recv_x, counts), handle, weights)


def _checkpoint_worker(rank, world_size):
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
    buf = moe_comm.Buffer(num_experts=max(4, 2 * world_size), timeout=120)
    layer = _moe_layer(buf, bias_update_rate=1.0)  # large: the routing after an update differs
    x = torch.randn([5, 0][rank], 8, generator=torch.Generator().manual_seed(rank))
    start = layer.expert_bias.clone()

    def run(call, body):  # -> outputs, gradients and the expert bias after one step from the same bias
        layer.expert_bias.copy_(start)
        # MoELayer sets its statistics in forward: a compiled checkpoint must be told not to
        # replay them (README: torch.compile).
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return _layer_grads(layer, call, x, aux_loss=body == "module") + [layer.expert_bias.clone()]

    dispatches = {}
    for body in ("module", "function"):
        fn = layer if body == "module" else functools.partial(_routed_experts, layer)
        want = run(fn, body)
        for policy in ("checkpoint", "save_exchanges"):
            context = {"context_fn": moe_comm.checkpoint_contexts} if policy == "save_exchanges" else {}

            def checkpointed(t):
                return checkpoint(fn, t, use_reentrant=False, **context)

            def checkpointed_to_the_end(t):  # the whole forward is recomputed, state updates included
                with set_checkpoint_early_stop(False):
                    return checkpointed(t)
            for compiled in (False, True):
                torch._dynamo.reset()
                call = (torch.compile(checkpointed, backend="aot_eager", fullgraph=True) if compiled
                        else checkpointed_to_the_end)
                before = buf._collectives["dispatch"]
                # The bias too: moved by the forward, not again by a recompute.
                if body == "module" and policy == "checkpoint" and compiled:
                    continue  # torch recomputes from the bias the forward updated in place: README
                _close(run(call, body), want, (body, policy, compiled))
                dispatches[body, policy, compiled] = buf._collectives["dispatch"] - before
    buf.close()
    return dispatches


def test_activation_checkpointing_eager_and_compiled():
    for dispatches in run_distributed(2, _checkpoint_worker, timeout=600):
        for body in ("module", "function"):
            # Plain checkpointing repeats the exchange in backward; save_exchanges keeps its outputs.
            assert dispatches[body, "checkpoint", False] == 2, dispatches
            assert dispatches[body, "save_exchanges", False] == 1, dispatches
            assert dispatches[body, "save_exchanges", True] == 1, dispatches
        assert dispatches["function", "checkpoint", True] == 2, dispatches


def _losses(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_tiny_moe.py"), "--steps", "6", "--tokens", "32",
           "--log-every", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]


def test_compiled_example_trains_like_eager():
    eager, compiled = _losses([]), _losses(["--compile"])
    assert len(eager) == 6 and compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
