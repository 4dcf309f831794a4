"""One rank of tests/test_cluster.py, run by bench/cluster.py inside an emulated node: a flat
and a hierarchical dispatch/combine checked against the reference over the shaped links, then
(fault "kill") the last rank dies before the next dispatch and the others must raise CommError
naming it, or every rank dispatches in a loop until node 1's link goes down (fault "link": the
test pulls it once every rank has written ready<r>) or the last rank dies 1.5 s into the loop
(fault "kill-mid"), and must raise CommError, then exit on its own. Writes
what it saw to $OUT/rank<r>.json."""

import json
import os
import sys
import threading
import time

import torch

import moe_comm
from moe_comm import reference
from moe_comm.launch import init_distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.cases import Case, all_inputs  # noqa: E402


TIMEOUT_S = 10  # the Buffer's: how long a fault takes to surface (tests/test_cluster.py)


def main(out_dir: str, fault: str) -> None:
    init_distributed("cpu")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seen = {"rank": rank, "node": int(os.environ["MOE_COMM_EMULATED_NODE"])}
    case = Case(world, 8, topk=3, hidden=40, pattern="skewed", tokens=(30, 0, 17, 9), seed=3)
    xs, idxs, ws = all_inputs(case)
    for hierarchical in (False, True):
        buf = moe_comm.Buffer(num_experts=8, hierarchical=hierarchical, timeout=TIMEOUT_S)
        recv_x, recv_w, counts, handle = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
        want = reference.dispatch_all(xs, idxs, ws, 8)[rank]
        ok = torch.equal(recv_x, want[0]) and torch.equal(recv_w, want[1]) and torch.equal(counts, want[2])
        y = moe_comm.combine(recv_x, handle, ws[rank])
        seen[f"hierarchical={hierarchical}"] = dict(ok=ok, transport=buf.cpu_transport, stats=handle.stats,
                                                    y_shape=list(y.shape))
        if not hierarchical:
            buf.close()
    if fault == "kill":  # the last rank dies; the others' next dispatch must name it
        if rank == world - 1:
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(seen, f)
            os._exit(0)
        time.sleep(1.0)
        started = time.monotonic()
        try:
            moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
            seen["fault"] = "no error"
        except moe_comm.CommError as exc:
            seen["fault"] = str(exc)
        seen["fault_seconds"] = time.monotonic() - started
    if fault == "kill-mid" and rank == world - 1:  # dies at an arbitrary point, most likely mid-dispatch
        def die():
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(dict(seen, fault="died"), f)
            os._exit(0)
        threading.Timer(1.5, die).start()
    if fault in ("link", "kill-mid"):
        open(os.path.join(out_dir, f"ready{rank}"), "w").close()
        seen["fault"], calls, last = "no error within 120 s", 0, time.monotonic()
        give_up = last + 120
        while time.monotonic() < give_up:
            try:
                recv_x, recv_w, counts, handle = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
                moe_comm.combine(recv_x, handle, ws[rank])
                calls, last = calls + 1, time.monotonic()
            except moe_comm.CommError as exc:
                seen["fault"] = str(exc)
                break
        seen["fault_seconds"], seen["calls"] = time.monotonic() - last, calls
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        return  # a normal exit: nothing may hang on the way out
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    os._exit(0)  # no teardown collective with a dead peer


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "none")
