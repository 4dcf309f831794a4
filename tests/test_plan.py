"""The planner's row accounting equals handle.stats of real dispatches on simulated
topologies, its expected rows equal that accounting, its busiest GPU matches a large sample,
and its CLI sweeps clusters, writes JSON and names its units."""

import json

import pytest
import torch

import moe_comm
from moe_comm import plan
from tests.cases import Case, all_inputs
from tests.distributed import run_distributed


def _stats_worker(rank, world_size, ranks_per_node, case):
    xs, idxs, ws = all_inputs(case)
    stats = {}
    for hierarchical in (False, True):
        buf = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=ranks_per_node,
                              hierarchical=hierarchical)
        stats[hierarchical] = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)[3].stats
    return stats


@pytest.mark.parametrize("nodes,ranks_per_node", [(2, 2), (4, 2), (2, 4), (8, 1)])
def test_link_rows_equal_handle_stats(nodes, ranks_per_node):
    W = nodes * ranks_per_node
    case = Case(W, 2 * W, topk=5, hidden=3, tokens=(40, 0, 17), pattern="masked", seed=nodes)
    per_rank = run_distributed(W, _stats_worker, ranks_per_node, case)
    _, idxs, _ = all_inputs(case)
    source = torch.cat([torch.full((idx.shape[0],), r) for r, idx in enumerate(idxs)])
    for hierarchical in (False, True):
        stats = [s[hierarchical] for s in per_rank]
        rows = plan.link_rows(torch.cat(idxs), source, case.num_experts, W, ranks_per_node, hierarchical)
        assert rows["intra_sent"].tolist() == [s["rows_sent_intra_node"] for s in stats], hierarchical
        assert rows["inter_sent"].tolist() == [s["rows_sent_inter_node"] for s in stats], hierarchical
        assert int(rows["intra_sent"].sum()) == int(rows["intra_recv"].sum())
        assert int(rows["inter_sent"].sum()) == int(rows["inter_recv"].sum())


def test_predictions_order_the_scenarios():
    cluster = plan.Cluster(nodes=8, gpus_per_node=8)
    out = {p.scenario: p for p in plan.plan(cluster, tokens=1024, hidden=1024, experts=256, topk=8,
                                            elem_bytes=2, max_nodes=2)}
    assert set(out) == {"flat", "hierarchical", "hierarchical+node-limited(2)"}
    assert out["hierarchical"].nic_bytes_per_gpu < out["flat"].nic_bytes_per_gpu
    assert out["hierarchical+node-limited(2)"].nic_bytes_per_gpu < out["hierarchical"].nic_bytes_per_gpu
    single = plan.plan(plan.Cluster(nodes=1, gpus_per_node=1), 64, 8, 8, 2, 2, None)
    assert [p.scenario for p in single] == ["flat"] and single[0].dispatch_us == 0


def test_cli_sweep_and_saved_routing(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan.main(["--preset", "tiny", "--max-gpus", "32", "--gpus-per-node", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped: 16 experts do not split over 32 GPUs" in printed
    records = json.loads(out.read_text())
    assert {r["gpus"] for r in records} == {1, 2, 4, 8, 16}
    assert {r["scenario"] for r in records} >= {"flat", "hierarchical"}
    saved = tmp_path / "idx.pt"
    torch.save(torch.randint(0, 16, (100, 1)), saved)
    assert plan.main(["--preset", "tiny", "--nodes", "2", "--gpus-per-node", "2", "--topk-idx", str(saved)]) == 0
    assert "hierarchical" in capsys.readouterr().out


def _random_routing(tokens, experts, topk, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randn(tokens, experts, generator=gen).topk(topk, dim=1).indices
    return idx.masked_fill(torch.rand(tokens, topk, generator=gen) < 0.2, -1)  # some unused slots


@pytest.mark.parametrize("nodes,ranks_per_node", [(1, 4), (2, 2), (4, 2), (2, 4)])
def test_expected_rows_equal_link_rows_when_every_gpu_routes_alike(nodes, ranks_per_node):
    W, T = nodes * ranks_per_node, 50
    idx = _random_routing(T, 2 * W, 5, seed=W)
    source = torch.arange(W).repeat_interleave(T)
    rank_p, node_p = plan.hit_probabilities(idx, 2 * W, W, ranks_per_node)
    for hierarchical in (False, True):
        counted = plan.link_rows(idx.repeat(W, 1), source, 2 * W, W, ranks_per_node, hierarchical)
        expected = plan.expected_link_rows(rank_p, node_p, T, ranks_per_node, hierarchical)
        for key, rows in counted.items():
            torch.testing.assert_close(expected[key], rows.double(), msg=f"{key}, hierarchical={hierarchical}")


@pytest.mark.parametrize("skew", [0.0, 1.0])
def test_busiest_gpu_at_default_sampling_matches_a_large_sample(skew):
    # The old default (the max over GPUs of 256 sampled tokens each) read 5-14% high here unskewed.
    cluster, experts, topk, per_gpu = plan.Cluster(nodes=4, gpus_per_node=8), 64, 4, 8192
    idx = plan.synthetic_routing(cluster, cluster.gpus * per_gpu, experts, topk, None, skew, seed=11)
    source = torch.arange(cluster.gpus).repeat_interleave(per_gpu)
    predictions = plan.plan(cluster, tokens=per_gpu, hidden=1, experts=experts, topk=topk, elem_bytes=1,
                            max_nodes=None, skew=skew)
    for p in predictions:
        rows = plan.link_rows(idx, source, experts, cluster.gpus, cluster.gpus_per_node, p.scenario != "flat")
        for link, predicted in (("inter", p.nic_bytes_per_gpu), ("intra", p.nvlink_bytes_per_gpu)):
            sampled = plan.busiest_gpu_bytes(rows, link, 1)  # one batch: its own max of noise on top
            assert 0.97 * sampled <= predicted <= 1.02 * sampled, (p.scenario, link, predicted, sampled)


def test_bandwidth_flags_say_gigabytes_and_the_old_spelling_warns(capsys):
    base = ["--preset", "tiny", "--nodes", "2", "--gpus-per-node", "2"]
    assert plan.main(base + ["--nic-GBps", "25", "--nvlink-GBps", "100"]) == 0
    new = capsys.readouterr()
    assert "NVLink 100 GB/s, NIC 25 GB/s" in new.out and new.err == ""
    assert plan.main(base + ["--nic-gbps", "25", "--nvlink-gbps", "100"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert "--nic-gbps is deprecated" in old.err and "--nic-GBps 25" in old.err and "--nvlink-GBps 100" in old.err
    with pytest.raises(SystemExit):
        plan.main(["--help"])
    help_text = capsys.readouterr().out
    assert f"(default: {plan.DEFAULT_NVLINK_GBYTES_PER_S})" in help_text and "gigabytes" in help_text
    assert "--nic-gbps" not in help_text
    # Achieved all-to-all rates, below the 450 GB/s NVLink 4 and 50 GB/s (400 Gb/s) NIC line rates.
    assert plan.Cluster(1, 1).nvlink_gbytes_per_s < 450 and plan.Cluster(1, 1).nic_gbytes_per_s < 50


def test_fp8_wire_shrinks_dispatch_rows_only():
    # DeepSeek-V3's hidden size: 7168 + 4 * 56 bytes a row, against 14336 in bf16.
    assert plan.dispatch_row_bytes(7168, 2, "fp8") == 7392 and plan.dispatch_row_bytes(7168, 2) == 14336
    assert plan.dispatch_row_bytes(129, 4, "fp8") == 129 + 8
    for hidden in (1, 128, 129, 7168):  # the engine's FP8 rows: payload, then the scales
        payload, _, _, _, scale_offset, scale_bytes = moe_comm.C.fp8_row_format(hidden, 8, 8)
        assert plan.dispatch_row_bytes(hidden, 2, "fp8") == payload + scale_bytes and scale_offset >= payload
    with pytest.raises(ValueError, match="wire_dtype"):
        plan.dispatch_row_bytes(128, 2, "fp4")
    cluster = plan.Cluster(nodes=2, gpus_per_node=4)
    native = plan.plan(cluster, 512, 7168, 64, 8, 2, 2)
    fp8 = plan.plan(cluster, 512, 7168, 64, 8, 2, 2, wire_dtype="fp8")
    for a, b in zip(native, fp8):
        assert b.nic_bytes_per_gpu == pytest.approx(a.nic_bytes_per_gpu * 7392 / 14336)
        assert b.nvlink_bytes_per_gpu == pytest.approx(a.nvlink_bytes_per_gpu * 7392 / 14336)
        assert b.dispatch_us < a.dispatch_us and b.combine_us == pytest.approx(a.combine_us)
    assert plan.main(["--preset", "deepseek-v3", "--nodes", "2", "--gpus-per-node", "4", "--wire-dtype", "fp8",
                      "--sample-tokens", "256"]) == 0


@pytest.mark.parametrize("hidden,elem,topk,wire", [(256, 2, 8, "native"), (7168, 2, 8, "fp8"), (41, 4, 3, "native"),
                                                    (130, 2, 1, "fp8"), (0, 2, 0, "native")])
def test_wire_rows_are_the_engines(hidden, elem, topk, wire):
    from moe_comm._native import C
    row = plan.wire_row_bytes(hidden, elem, topk, wire)
    fmt = C.fp8_row_format(hidden, topk, 8) if wire == "fp8" else C.row_format(hidden, elem, topk, 8)
    assert row.dispatch_wire == fmt[3] and row.dispatch == plan.dispatch_row_bytes(hidden, elem, wire)
    assert row.combine_wire == C.row_format(hidden, elem, 0, 0)[3]


def test_a_nic_per_node_carries_the_whole_nodes_rows():
    per_gpu = plan.Cluster(nodes=2, gpus_per_node=4, nic_gbytes_per_s=1.0, nic_latency_us=0)
    per_node = plan.Cluster(nodes=2, gpus_per_node=4, nic_gbytes_per_s=1.0, nic_latency_us=0, nic_per_node=True)
    a, b = (plan.plan(c, 256, 256, 64, 8, 2, None) for c in (per_gpu, per_node))
    for x, y in zip(a, b):
        assert y.nic_wire_bytes == pytest.approx(4 * x.nic_wire_bytes)  # 4 GPUs share the node's NIC
        assert y.nic_bytes_per_gpu == x.nic_bytes_per_gpu  # the busiest GPU's payload, as before
        assert y.dispatch_us > 3 * x.dispatch_us
    assert plan.main(["--preset", "tiny", "--nodes", "2", "--gpus-per-node", "4", "--nic-per", "node"]) == 0
