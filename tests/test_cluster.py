"""bench/cluster.py, the emulated cluster (issue #17): 2 nodes x 2 ranks in network namespaces
with a shaped inter-node link. Dispatch and combine over it equal the reference (also with 2%
of the packets lost), flat (every stage over the network) and hierarchical (the intra-node
stage on shared memory). Faults: a rank killed before a dispatch, a rank dying mid-dispatch, a
node whose link goes down mid-dispatch: every other rank raises CommError naming its stage
within the Buffer's timeout (plus the roll call's few seconds) and exits on its own; an
interrupted run; nothing is left behind. Skips, saying why, where namespaces cannot be made
(not root, no ip)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cluster  # noqa: E402


def _namespaces_work() -> str:
    """'' when this machine can make a namespace with a veth in it, else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces need it"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "no ip/tc (iproute2)"
    probe = f"{cluster.PREFIX}{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        veth = subprocess.run(["ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0"],
                              capture_output=True, text=True)
        tbf = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "a0", "root", "tbf", "rate", "100mbit",
                              "burst", "64kb", "latency", "400ms"], capture_output=True, text=True)
        if veth.returncode != 0 or tbf.returncode != 0:
            return f"veth or tbf unavailable: {(veth.stderr or tbf.stderr).strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _loss_works() -> str:
    """'' when bench/cluster.py can make a link lossy here (netem, or nftables), else why not."""
    if WHY_NOT or shutil.which("nft"):
        return WHY_NOT
    probe = f"{cluster.PREFIX}{os.getpid()}probe"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    try:
        netem = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "loss", "1%"],
                               capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return "" if netem.returncode == 0 else "no netem qdisc and no nftables (apt install nftables): no lossy links"


WHY_NOT = _namespaces_work()
WHY_NO_LOSS = _loss_works()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


def _ours() -> set:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(cluster.PREFIX)}


def _run(tmp_path, fault: str, link=()):
    before = _ours()
    cmd = [sys.executable, os.path.join(ROOT, "bench", "cluster.py"), "--nodes", "2", "--ranks-per-node", "2",
           "--inter-node-rate", "200mbit", *link, "--timeout", "240", "--", sys.executable,
           os.path.join(ROOT, "tests", "cluster_rank.py"), str(tmp_path), fault]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ours() == before  # every namespace it made is gone
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left behind: {leftover}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("link", [(), ("--loss", "2%")], ids=["shaped", "lossy"])
def test_dispatch_over_the_emulated_cluster_equals_the_reference(tmp_path, link):
    """Bit-identical to the reference on a slow link, and on a lossy one (TCP resends)."""
    if link and WHY_NO_LOSS:
        pytest.skip(WHY_NO_LOSS)
    seen = _run(tmp_path, "none", link)
    assert [s["node"] for s in seen] == [0, 0, 1, 1]
    for s in seen:
        flat, hier = s["hierarchical=False"], s["hierarchical=True"]
        assert flat["ok"] and hier["ok"]
        assert flat["transport"] == "gloo" and hier["transport"] == "shm+gloo"  # shm inside a node only
    # Hierarchical: each token crosses the network once per destination node.
    inter = lambda key: sum(s[key]["stats"]["rows_sent_inter_node"] for s in seen)  # noqa: E731
    assert 0 < inter("hierarchical=True") < inter("hierarchical=False")


def test_a_rank_killed_before_a_dispatch_ends_every_other_rank_in_comm_error(tmp_path):
    """Rank 3 dies. Every other rank raises CommError within its timeout (10 s), naming its stage
    and the rank it waited for: its rail peer (rank 1) or its node peer (rank 2) names rank 3;
    rank 0 names rank 1, and that rank 1 was itself stuck in another stage (waiting for rank 3)."""
    seen = _run(tmp_path, "kill")
    named = {}
    for s in seen[:3]:
        match = re.search(r"rank (\d) of 4 failed in stage '[^']+' (.*)", s["fault"])
        assert match and int(match.group(1)) == s["rank"] and s["fault_seconds"] < 10 + 15, s["fault"]
        named[s["rank"]] = {int(r) for r in re.findall(r"rank (\d)", match.group(2))} - {s["rank"]}
    assert all(named.values()) and 3 in named[1] and 3 in named[2], named
    if 1 in named[0]:  # rank 1 failed in its inter-node stage first, and rank 0's error says so
        assert "rank 1 was itself stuck in stage 'dispatch/inter_node" in seen[0]["fault"], seen[0]["fault"]


def _loop_until_a_fault(tmp_path, fault, link_down=None):
    """cluster_rank.py's dispatch loop on a 2x2 cluster, with `fault`. -> what each rank saw."""
    argv = [sys.executable, os.path.join(ROOT, "tests", "cluster_rank.py"), str(tmp_path), fault]
    before = _ours()
    env_before = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    try:
        with cluster.Cluster(2, rate="200mbit") as made:
            codes = cluster.launch(made, 2, argv, port=29517, timeout=240, link_down=link_down)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert codes == [0, 0, 0, 0], codes  # each ended on its own, none was killed
    assert _ours() == before
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left behind: {leftover}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]


def _comm_error(s):
    """-> (stage, the parenthesis of why) of a rank's CommError; asserts it names the rank."""
    match = re.search(r"rank (\d) of 4 failed in stage '([^']+)' \((.*)\)", s["fault"])
    assert match and int(match.group(1)) == s["rank"], s["fault"]
    assert s["fault_seconds"] < 10 + 15, s  # the timeout, and the roll call's few seconds
    return match.group(2), match.group(3)


def test_a_node_cut_off_mid_dispatch_ends_every_rank_in_comm_error(tmp_path):
    """Node 1's link goes down while every rank is dispatching in a loop. Node 0's ranks name the
    rank they waited for (one of them a rank of node 1); node 1's ranks cannot reach the store
    either (it lives on node 0) and say so. Every rank raises within its timeout (10 s) plus the
    roll call's few seconds, then exits on its own (the launcher ends nobody)."""
    ready = lambda: all((tmp_path / f"ready{r}").exists() for r in range(4))  # noqa: E731
    seen = _loop_until_a_fault(tmp_path, "link", link_down=(1, ready))
    named = set()
    for s in seen:
        _, why = _comm_error(s)
        if s["node"] == 0:  # the rank it waited for: across the cut, or its node peer waiting there
            named |= {int(r) for r in re.findall(r"rank (\d) did not arrive", why)}
        else:
            assert "store did not answer either" in why, s["fault"]
    # Node 0 names a rank across the cut, unless node 1's ranks had signed that very collective
    # (a call slower than a second on a busy machine) before their link went.
    assert named & {2, 3} or any("every peer arrived" in s["fault"] for s in seen[:2]), [s["fault"] for s in seen]


def test_a_rank_dying_mid_dispatch_ends_every_other_rank_in_comm_error(tmp_path):
    """Rank 3 exits at an arbitrary moment of its dispatch loop (its sockets close under its
    peers' collectives): ranks 0-2 raise CommError naming their stage, and exit on their own."""
    seen = _loop_until_a_fault(tmp_path, "kill-mid")
    assert seen[3]["fault"] == "died"
    for s in seen[:3]:
        _comm_error(s)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, signal_name):
    """Ctrl-C or a kill of the harness mid-run: its ranks and its namespaces are gone after."""
    import signal
    import time
    before = _ours()
    marker = tmp_path / "started"
    rank = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(300)  # {tmp_path}"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "cluster.py"), "--nodes", "2",
                             "--ranks-per-node", "2", "--", sys.executable, "-c", rank],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists() and _ours() - before, "the cluster never came up"
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert _ours() == before
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left behind: {leftover}"


def test_cluster_refuses_clearly_without_root_or_tools(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(cluster.ClusterError, match="run it as root"):
        cluster.preflight()
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(cluster.ClusterError, match="needs ip and tc"):
        cluster.preflight()
    with pytest.raises(cluster.ClusterError, match="--loss must be a percentage"):
        cluster.Cluster(2, loss="lots")
