"""Property-based tests (hypothesis) over random topologies and routings, and a soak test.

Every rank runs the same derandomized hypothesis search, so all ranks draw the same examples in
lockstep; shrinking is off, since ranks must not diverge.
"""

import os
import threading

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import moe_comm
from tests.distributed import run_distributed

SETTINGS = dict(max_examples=30, derandomize=True, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _inputs(rank, T, H, E, K, mask, one_expert, dtype, seed):
    gen = torch.Generator().manual_seed(seed * 131 + rank)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    if one_expert:  # every token picks expert 0 (in slot 0; no repeats elsewhere)
        idx = idx.masked_fill(idx == 0, -1)
        idx[:, 0] = 0
    idx = idx.masked_fill(torch.rand(T, K, generator=gen) < mask, -1)
    x = torch.randn(T, H, generator=gen).to(dtype)
    return x, idx, torch.rand(T, K, generator=gen)


def _property_worker(rank, world_size):
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    buffers = {}

    @settings(**SETTINGS)
    @given(st.data())
    def identity_experts_conserve_rows_and_repeat(data):
        ranks_per_node = data.draw(st.sampled_from(divisors))
        hierarchical = data.draw(st.sampled_from(["auto", False]))
        E = world_size * data.draw(st.integers(1, 3))
        K = data.draw(st.integers(1, E))
        tokens = data.draw(st.lists(st.integers(0, 12), min_size=world_size, max_size=world_size))
        H = data.draw(st.integers(1, 9))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        mask = data.draw(st.sampled_from([0.0, 0.3, 1.0]))
        one_expert = data.draw(st.booleans())
        seed = data.draw(st.integers(0, 2 ** 16))
        key = (E, ranks_per_node, hierarchical)
        if key not in buffers:
            buffers[key] = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node, hierarchical=hierarchical)
        buf = buffers[key]
        x, idx, w = _inputs(rank, tokens[rank], H, E, K, mask, one_expert, dtype, seed)

        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf)
        # Rows are conserved: received rows over all ranks = valid (token, expert) pairs.
        totals = torch.tensor([recv_x.shape[0], int((idx >= 0).sum())])
        torch.distributed.all_reduce(totals)
        assert totals[0] == totals[1] and int(counts.sum()) == recv_x.shape[0]
        # Identity experts: combine(dispatch(x)) = x * (sum of the token's valid weights).
        y = moe_comm.combine(recv_x, handle, w)
        expected = (x.float() * (w * (idx >= 0)).sum(1, keepdim=True)).to(dtype)
        torch.testing.assert_close(y.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
        # Run to run, the results are identical.
        again = moe_comm.dispatch(x, idx, w, buf)
        assert torch.equal(again[0], recv_x) and torch.equal(again[1], recv_w)
        assert torch.equal(moe_comm.combine(again[0], again[3], w), y)

    identity_experts_conserve_rows_and_repeat()
    return True


def test_properties_on_random_topologies_and_routings():
    assert run_distributed(4, _property_worker, timeout=240) == [True] * 4


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _native_threads():
    return len(os.listdir("/proc/self/task"))  # every thread, also those C++ started


def _child_processes():
    me, children = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    children.append(pid)
        except OSError:  # gone meanwhile
            pass
    return children


def _soak_worker(rank, world_size, iterations):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=1)  # 2 simulated nodes: both stages run
    threads, native, children = threading.active_count(), _native_threads(), _child_processes()
    gen = torch.Generator().manual_seed(rank)
    rss = []
    for i in range(iterations):
        T = [0, 1, 17, 64, 5][(i + rank) % 5]
        H = [8, 24][i % 2]
        x = torch.randn(T, H, generator=gen, requires_grad=True)
        idx = torch.rand(T, 8, generator=gen).argsort(dim=1)[:, :3]
        w = torch.rand(T, 3, generator=gen, requires_grad=True)
        recv_x, recv_w, _, handle = moe_comm.dispatch(x, idx, w, buf)
        y = moe_comm.combine(recv_x * 2, handle, w)
        (y.sum() + recv_w.sum()).backward()
        assert x.grad.shape == x.shape
        if i in (iterations // 5, iterations - 1):
            rss.append(_rss_bytes())
    assert threading.active_count() == threads, "Python threads leaked"
    assert _native_threads() == native, f"native threads: {native} before, {_native_threads()} after"
    assert _child_processes() == children, "child processes leaked"
    return rss


def test_soak_thousands_of_calls_keep_memory_flat():
    """1000 steps of dispatch, combine and backward (3000 calls) with changing shapes."""
    results = run_distributed(2, _soak_worker, 1000, timeout=280)
    for early, late in results:
        assert late - early < 16 * 2 ** 20, f"RSS grew by {(late - early) / 2 ** 20:.1f} MiB"
