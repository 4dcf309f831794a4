"""A multi-node cluster on one Linux machine (issue #17): each node a network namespace, its NIC
a veth pair into a switch namespace (a bridge), the inter-node links shaped with tc (rate,
delay, loss: netem, or nftables where the kernel has no netem); inside a node, ranks talk over the node's own address, which the kernel delivers
locally: the fast intra-node link. Runs a command once per rank with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and always tears
everything down: on success, failure, Ctrl-C or SIGTERM. Needs root, `ip` and `tc`.

    sudo python bench/cluster.py --nodes 2 --ranks-per-node 4 --inter-node-rate 100mbit \\
        --inter-node-delay 1ms -- python bench/bench_dispatch_combine.py --cpu-transport gloo

Every name it makes starts with `mcl<pid>` (namespaces, links), and addresses are in
10.213.0.0/24 inside those namespaces only: nothing outside them changes. `--cleanup` removes
what a killed run left behind.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional, Tuple, Union

SUBNET = "10.213.0"  # node n is SUBNET.(n + 1); only inside the namespaces this script makes
PREFIX = "mcl"


class ClusterError(RuntimeError):
    pass


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def preflight() -> None:
    """Root, and the tools: a clear error before anything is made."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"bench/cluster.py needs {' and '.join(missing)} (Debian: apt install iproute2)")
    if os.geteuid() != 0:
        raise ClusterError("bench/cluster.py makes network namespaces and shapes links: run it as root")


class Cluster:
    """N node namespaces around a switch namespace. Use as a context manager: __exit__ removes
    every namespace it made (their links go with them)."""

    def __init__(self, nodes: int, rate: Optional[str] = None, delay: Optional[str] = None,
                 loss: Optional[str] = None, tag: Optional[str] = None):
        if nodes < 1 or nodes > 200:
            raise ClusterError(f"--nodes must be in [1, 200], got {nodes}")
        if loss:
            parse_loss(loss)  # before anything is made
        self.nodes, self.rate, self.delay, self.loss = nodes, rate, delay, loss
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.made: List[str] = []

    def node_ns(self, n: int) -> str:
        return f"{self.tag}n{n}"

    @property
    def switch_ns(self) -> str:
        return f"{self.tag}sw"

    def address(self, n: int) -> str:
        return f"{SUBNET}.{n + 1}"

    def __enter__(self) -> "Cluster":
        preflight()
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _ns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._ns(self.switch_ns)
        run("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
        for n in range(self.nodes):
            ns = self.node_ns(n)
            self._ns(ns)
            # The node's NIC (eth0 inside it) and its switch port (p<n>), made in the node's
            # namespace, the port then moved to the switch.
            run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}")
            run("ip", "-n", ns, "link", "set", f"p{n}", "netns", self.switch_ns)
            run("ip", "-n", self.switch_ns, "link", "set", f"p{n}", "master", "br0")
            run("ip", "-n", self.switch_ns, "link", "set", f"p{n}", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            self.shape(n)

    def shape(self, n: int, rate: Optional[str] = None, delay: Optional[str] = None,
              loss: Optional[str] = None) -> None:
        """The inter-node link of node n, both directions: what it sends (its eth0) and what it
        receives (its switch port). Arguments override the cluster's."""
        rate, delay, loss = rate or self.rate, delay or self.delay, loss or self.loss
        for ns, dev in ((self.node_ns(n), "eth0"), (self.switch_ns, f"p{n}")):
            run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            run("ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", f"{PREFIX}_loss_{dev}", check=False)
            parent = ["root"]
            if delay or loss:
                netem = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem"]
                netem += (["delay", delay] if delay else []) + (["loss", loss] if loss else [])
                netem += ["limit", "100000"]
                if run(*netem, check=False).returncode == 0:
                    parent = ["parent", "1:1"]
                elif delay:
                    raise ClusterError("this kernel has no netem qdisc (module sch_netem): --inter-node-delay needs "
                                       "it; --inter-node-rate alone uses tbf, --loss falls back to nftables")
                else:
                    self._drop_at_random(ns, dev, loss)
            if rate:
                # A token bucket: the burst one timer tick needs at this rate, at least 64 KB.
                run("tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf", "rate", rate,
                    "burst", "64kb", "latency", "400ms")

    @staticmethod
    def _drop_at_random(ns: str, dev: str, loss: str) -> None:
        """Loss without netem: an nftables rule dropping that fraction of the packets arriving
        on dev (on the node's eth0: what it receives; on its switch port: what it sends)."""
        if shutil.which("nft") is None:
            raise ClusterError("--loss needs the kernel's netem qdisc or nftables, and this machine has neither "
                               "(Debian: apt install nftables)")
        percent = parse_loss(loss)
        per_million = round(percent * 1e4)
        if per_million == 0 and percent > 0:
            raise ClusterError(f"--loss {loss}: below the rule's resolution (0.0001%)")
        rules = (f"table netdev {PREFIX}_loss_{dev} {{\n  chain ingress {{\n"
                 f'    type filter hook ingress device "{dev}" priority 0; policy accept;\n'
                 f"    numgen random mod 1000000 < {per_million} counter drop\n  }}\n}}\n")
        proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise ClusterError(f"--loss: nft could not add its rule: {proc.stderr.strip()}")

    def link(self, n: int, up: bool) -> None:
        """Node n's NIC up or down (a fault: a cable pulled)."""
        run("ip", "-n", self.node_ns(n), "link", "set", "eth0", "up" if up else "down")

    def teardown(self) -> None:
        for name in reversed(self.made):
            run("ip", "netns", "del", name, check=False)
        self.made.clear()


def parse_loss(loss: str) -> float:
    """'0.1%' or '0.1' -> 0.1 (percent of packets)."""
    try:
        value = float(loss.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:
        raise ClusterError(f"--loss must be a percentage in [0, 100], e.g. 0.1%, got {loss!r}")
    return value


def cleanup_stale() -> List[str]:
    """Namespaces a killed run of this script left (their owner process is gone). -> removed."""
    removed = []
    for line in run("ip", "netns", "list").stdout.splitlines():
        match = re.match(rf"^{PREFIX}(\d+)(?:n\d+|sw)\b", line.strip())
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            name = line.split()[0]
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def rank_env(cluster: Cluster, node: int, local: int, ranks_per_node: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(node * ranks_per_node + local), WORLD_SIZE=str(cluster.nodes * ranks_per_node),
               LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(ranks_per_node), GROUP_RANK=str(node),
               NODE_RANK=str(node), MASTER_ADDR=cluster.address(0), MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME="eth0", MOE_COMM_EMULATED_NODE=str(node))
    return env


def launch(cluster: Cluster, ranks_per_node: int, command: List[str], port: int = 29500,
           timeout: Optional[float] = None,
           link_down: Optional[Tuple[int, Union[float, Callable[[], bool]]]] = None, output=None) -> List[int]:
    """The command once per rank, in its node's namespace; waits for all. A rank that fails
    ends the others (as torchrun does). link_down: (node, when): that node's link goes down
    `when` seconds after the start, or once `when()` is true (a fault). output: a file for the
    ranks' stdout and stderr (default: this process's). -> exit codes by rank."""
    procs = []
    started = time.monotonic()
    try:
        for n in range(cluster.nodes):
            for local in range(ranks_per_node):
                argv = ["ip", "netns", "exec", cluster.node_ns(n), *command]
                procs.append(subprocess.Popen(argv, env=rank_env(cluster, n, local, ranks_per_node, port),
                                              start_new_session=True, stdout=output,
                                              stderr=None if output is None else subprocess.STDOUT))
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            when = None if link_down is None else link_down[1]
            if when is not None and (when() if callable(when) else time.monotonic() - started >= when):
                print(f"bench/cluster.py: node {link_down[0]}'s link down", file=sys.stderr, flush=True)
                cluster.link(link_down[0], up=False)
                link_down = None
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # whatever is still running: its whole process group
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--inter-node-rate", help="tc rate of every node's link, e.g. 100mbit (default: unshaped)")
    p.add_argument("--inter-node-delay", help="one-way delay added to every node's link, e.g. 1ms")
    p.add_argument("--loss", help="packet loss on every node's link, both ways, e.g. 0.1%% (netem, else nftables); "
                                  "a packet between two nodes crosses two such links: about twice that")
    p.add_argument("--port", type=int, default=29500, help="MASTER_PORT")
    p.add_argument("--timeout", type=float, help="seconds before the ranks still running are ended")
    p.add_argument("--link-down", metavar="NODE:SECONDS", help="a fault: that node's link goes down that long "
                                                                  "after the start")
    p.add_argument("--cleanup", action="store_true", help="remove namespaces a killed run left, then exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every rank runs")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.cleanup and not args.command:
        p.error("give the command every rank runs after --")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        preflight()
        if args.cleanup:
            print(f"removed: {cleanup_stale() or 'nothing'}")
            return 0
        # SIGTERM ends like Ctrl-C: through the finally clauses that end the ranks and the namespaces.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with Cluster(args.nodes, args.inter_node_rate, args.inter_node_delay, args.loss) as cluster:
            fault = None
            if args.link_down:
                node, seconds = args.link_down.split(":")
                fault = (int(node), float(seconds))
            codes = launch(cluster, args.ranks_per_node, args.command, args.port, args.timeout, fault)
    except ClusterError as exc:
        print(f"bench/cluster.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench/cluster.py: interrupted; the ranks and the namespaces are gone", file=sys.stderr)
        return 130
    bad = {rank: code for rank, code in enumerate(codes) if code != 0}
    if bad:
        print(f"bench/cluster.py: ranks failed (rank: exit code): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
