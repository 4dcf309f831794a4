"""Single-device bandwidth of moe_comm's token kernels against a plain device-to-device copy
measured in the same run (issue: each should reach >= 80% of the copy's bandwidth).

    python bench/bench_kernels.py                      # DeepSeek-V3 shape, on CUDA if there is one
    python bench/bench_kernels.py --device cpu --tokens 256 --hidden 128

Kernels, with the bytes they must read and write (the "moved" bytes; GB/s = moved / time):
  copy     x -> clone of x                                   2 * T * H * e
  pack     x -> send rows, one per (token, destination rank) T*H*e + n_send * row_bytes
  pack_fp8 the same, quantized to FP8 rows (e4m3 + per-128 scales) T*H*e + n_send * fp8_row_bytes
  expand   arrived rows -> expert-major recv_x (plan + scatter) n_send * row_bytes + R * H * e
  reduce   expert rows -> one weighted float32 sum per token   R * H * e + n_send * H * e
The packed rows of all `--ranks` destinations are expanded as if one rank received them, so
every (token, expert) pair is expanded once (R = valid pairs).
"""

import argparse
import json
import os
import statistics
import sys

import torch

import moe_comm
from moe_comm._native import C as _C

SLOT_META_BYTES = _C.SLOT_META_BYTES
from moe_comm.streams import stream_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from presets import PRESETS  # noqa: E402
from timing import sample_seconds  # noqa: E402

C = moe_comm.C
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = PRESETS["deepseek-v3"]
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tokens", type=int, default=shape["tokens"])
    p.add_argument("--hidden", type=int, default=shape["hidden"])
    p.add_argument("--experts", type=int, default=shape["experts"])
    p.add_argument("--topk", type=int, default=shape["topk"])
    p.add_argument("--ranks", type=int, default=8, help="destination ranks the tokens are packed for")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=shape["dtype"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def median_seconds(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    samples = [sample_seconds(fn, device) for _ in range(iters)]
    return statistics.median(samples)


def main(argv=None):
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    stream = stream_of(device)
    T, H, E, K, W = args.tokens, args.hidden, args.experts, args.topk, args.ranks
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    logits = torch.randn(T, E, generator=gen).to(device)
    idx, weights = moe_comm.node_limited_topk(logits, K, 1, 1, score_func="softmax")
    e = x.element_size()

    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, W, stream)
    n_send = int(offsets[-1])
    send_token = send_token[:n_send]
    row_bytes = C.row_format(H, e, K, SLOT_META_BYTES)[3]
    rows = torch.empty((n_send, row_bytes), dtype=torch.uint8, device=device)
    fp8_row_bytes = C.fp8_row_format(H, K, SLOT_META_BYTES)[3]
    fp8_rows = torch.empty((n_send, fp8_row_bytes), dtype=torch.uint8, device=device)
    C.pack_rows(x, send_token, offsets, idx, weights, E // W, rows, stream)
    recv_x, _, counts, row_map, slot_weights = C.expand_rows(rows, H, dtype, K, E // W, None, None, stream)
    R = recv_x.shape[0]
    out = torch.empty((n_send, H), dtype=dtype, device=device)
    copy_dst = torch.empty_like(x)

    kernels = {
        "copy": (lambda: copy_dst.copy_(x), 2 * T * H * e),
        "pack": (lambda: C.pack_rows(x, send_token, offsets, idx, weights, E // W, rows, stream),
                 T * H * e + n_send * row_bytes),
        "pack_fp8": (lambda: C.pack_rows(x, send_token, offsets, idx, weights, E // W, fp8_rows, stream, True),
                     T * H * e + n_send * fp8_row_bytes),
        "expand": (lambda: C.expand_rows(rows, H, dtype, K, E // W, None, counts, stream),
                   n_send * row_bytes + R * H * e),
        "reduce": (lambda: C.reduce_rows(recv_x, row_map, slot_weights, out, stream), R * H * e + n_send * H * e),
    }
    records = []
    for name, (fn, moved) in kernels.items():
        seconds = median_seconds(fn, device, args.warmup, args.iters)
        records.append(dict(kernel=name, median_us=seconds * 1e6, bytes_moved=moved, gbps=moved / seconds / 1e9,
                            device=str(torch.cuda.get_device_name(device) if use_cuda else "cpu"),
                            tokens=T, hidden=H, experts=E, topk=K, ranks=W, dtype=args.dtype))
    copy_gbps = records[0]["gbps"]
    print(f"moe_comm {moe_comm.__version__} kernels on {records[0]['device']}: {T} tokens, hidden {H}, "
          f"{E} experts, top-{K}, {W} destination ranks, {args.dtype}; {n_send} send rows, {R} expert rows")
    print(f"{'kernel':<8} {'median us':>10} {'MB moved':>10} {'GB/s':>8} {'of copy':>8}")
    for r in records:
        r["fraction_of_copy"] = r["gbps"] / copy_gbps
        print(f"{r['kernel']:<8} {r['median_us']:>10.1f} {r['bytes_moved'] / 1e6:>10.1f} {r['gbps']:>8.1f} "
              f"{100 * r['fraction_of_copy']:>7.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    main()
