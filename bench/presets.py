"""Model shapes for the benchmark (tokens are per rank)."""

PRESETS = {
    # CPU-sized, for gloo on a laptop or CI.
    "tiny": dict(tokens=512, hidden=256, experts=16, topk=4, dtype="float32"),
    "mixtral-8x7b": dict(tokens=4096, hidden=4096, experts=8, topk=2, dtype="bfloat16"),
    "deepseek-v3": dict(tokens=4096, hidden=7168, experts=256, topk=8, dtype="bfloat16", max_nodes=4),
    "qwen3-moe": dict(tokens=4096, hidden=4096, experts=128, topk=8, dtype="bfloat16"),
}
