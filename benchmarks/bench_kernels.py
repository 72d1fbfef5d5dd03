"""Microbenchmark of the paged kernels: torch reference vs Triton, as effective GB/s.

    python benchmarks/bench_kernels.py            # CUDA if present (both paths), else CPU (torch path)
    python benchmarks/bench_kernels.py --quick    # small sizes (also: --triton-interpret on CPU)

Scoring GB/s counts one read of the request's keys (the kernel reads them twice: pass 1 and 2);
compaction GB/s counts keys+values read and written once. Shapes follow Qwen2.5-VL-7B (28 query
heads, 4 KV heads, head_dim 128), window 32. Writes benchmarks/results/kernels.json (+ .png).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--quick", action="store_true", help="lengths 512 and 2048, fewer repeats")
    p.add_argument("--triton-interpret", action="store_true", help="on CPU, also time Triton via TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels"))
    return p.parse_args()


def timed(fn, device, repeats):
    import torch

    fn()  # warm-up (and Triton compile)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    args = parse_args()
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MADAKV_FORCE_TRITON"] = "1"
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _stamp import stamp, write_results

    import madakv_kernels as mk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    lengths = [512, 2048] if args.quick else args.lengths
    repeats = 3 if (args.quick or device == "cpu") else 20
    num_q, num_kv, head_dim, window = 28, 4, 128, 32
    block_size = 16 if device == "cuda" else 128
    layout = "NHD" if device == "cuda" else "HND"
    impls = {"torch": (mk.window_scores_torch, mk.compact_kv_torch)}
    if device == "cuda" or args.triton_interpret:
        impls["triton"] = (mk.window_scores_triton, mk.compact_kv_triton)
    elt = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for n in lengths:
        blocks = math.ceil(n / block_size)
        kept = max(window, n // 5)
        dst_blocks = math.ceil(kept / block_size)
        shape = (blocks + dst_blocks, block_size, num_kv, head_dim)
        if layout == "HND":
            shape = (shape[0], num_kv, block_size, head_dim)
        keys = torch.randn(shape, device=device).to(dtype)
        values = torch.randn(shape, device=device).to(dtype)
        src = torch.arange(blocks, dtype=torch.int32, device=device)
        dst = torch.arange(blocks, blocks + dst_blocks, dtype=torch.int32, device=device)
        queries = torch.randn(window, num_q, head_dim, device=device).to(dtype)
        keep = torch.stack([torch.randperm(n, device=device)[:kept].sort().values for _ in range(num_kv)]).int()
        key_bytes = n * num_kv * head_dim * elt
        moved_bytes = 2 * 2 * kept * num_kv * head_dim * elt
        for name, (score, compact) in impls.items():
            t_score = timed(lambda: score(keys, src, queries, n, layout), device, repeats)
            t_compact = timed(lambda: compact(keys, values, src, dst, keep, layout), device, repeats)
            row = dict(impl=name, n=n, kept=kept, score_ms=t_score * 1e3, score_gbps=key_bytes / t_score / 1e9,
                       compact_ms=t_compact * 1e3, compact_gbps=moved_bytes / t_compact / 1e9)
            rows.append(row)
            print(f"{name:6s} N={n:6d}  score {row['score_ms']:9.3f} ms {row['score_gbps']:8.2f} GB/s   "
                  f"compact {row['compact_ms']:8.3f} ms {row['compact_gbps']:8.2f} GB/s", flush=True)
    result = dict(stamp=stamp(), device=device, dtype=args.dtype, layout=layout, block_size=block_size,
                  heads=dict(q=num_q, kv=num_kv, head_dim=head_dim), window=window, rows=rows)
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric, title in ((axes[0], "score_gbps", "window scoring"), (axes[1], "compact_gbps", "compaction")):
            for name in impls:
                pts = [(r["n"], r[metric]) for r in rows if r["impl"] == name]
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xscale="log", xlabel="context tokens", ylabel="GB/s", title=f"{title}, {args.dtype}")
            ax.legend()
        return fig

    write_results(args.out, result, draw)

if __name__ == "__main__":
    main()
