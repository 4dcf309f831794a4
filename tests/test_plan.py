"""The planner's row accounting equals handle.stats of real dispatches on simulated
topologies, and its CLI sweeps clusters and writes JSON."""

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
