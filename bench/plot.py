"""Draws benchmark records: latency and logical bandwidth (bench/README.md) against tokens per
rank."""


def plot_records(records, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - scripts/env.sh installs it
        raise SystemExit(f"--plot needs matplotlib ({exc}): pip install matplotlib") from exc
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, style in (("moe_comm", "-"), ("torch_baseline", "--")):
        for op, color in (("dispatch", "tab:blue"), ("combine", "tab:orange"), ("roundtrip", "tab:green")):
            rows = sorted((r for r in records if r["impl"] == impl and r["op"] == op), key=lambda r: r["tokens"])
            if not rows:
                continue
            tokens = [r["tokens"] for r in rows]
            lat.plot(tokens, [r["median_us"] for r in rows], style, color=color, marker="o", label=f"{impl} {op}")
            if op != "roundtrip":
                bw.plot(tokens, [r["gbps_logical"] for r in rows], style, color=color, marker="o",
                        label=f"{impl} {op}")
    first = records[0]
    title = (f"{first['world_size']} ranks, hidden {first['hidden']}, {first['experts']} experts, "
             f"top-{first['topk']}, {first['dtype']}, {first['backend']}/{first['device']}")
    lat.set(xlabel="tokens per rank", ylabel="median latency (us)", xscale="log", yscale="log", title=title)
    bw.set(xlabel="tokens per rank", ylabel="logical GB/s per rank (own rows included)", xscale="log",
           title="bandwidth (logical bytes / ranks / median)")
    lat.legend(fontsize=7)
    bw.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
