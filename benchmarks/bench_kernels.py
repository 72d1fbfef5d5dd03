"""Microbenchmark of the paged kernels: torch reference vs Triton, as GB/s and % of peak HBM.

    python benchmarks/bench_kernels.py            # CUDA if present (both paths), else CPU (torch path)
    python benchmarks/bench_kernels.py --quick    # small sizes (also: --triton-interpret on CPU)

Shapes follow Qwen2.5-VL-7B (28 query heads, 4 KV heads, head_dim 128), window 32, one layer of
one request. Byte counts:
  - scoring "effective" GB/s counts one read of the request's keys (what an ideal kernel must
    read); the Triton kernel reads them twice (pass 1 and pass 2), reported as "moved" GB/s;
  - compaction counts keys + values of the kept 20 % read and written once.
On CUDA every timing is triton.testing.do_bench (CUDA events, L2 flushed before each run, so no
setting profits from another's cached keys), and the percentages are of the card's datasheet peak
HBM bandwidth, next to a measured device-to-device copy. Writes benchmarks/results/kernels.json (+ .png).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

# Datasheet HBM bandwidth (bytes/s) by the name torch reports; unknown cards get no percentage.
PEAK_HBM = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
            "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "L40S": 0.864e12}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="context lengths (default: 8K 32K 128K on CUDA, 2K 8K 32K on CPU)")
    p.add_argument("--quick", action="store_true", help="lengths 512 and 2048, fewer repeats")
    p.add_argument("--triton-interpret", action="store_true", help="on CPU, also time Triton via TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-tune", action="store_true", help="CUDA: skip the tile-size sweep, use the defaults")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels"))
    return p.parse_args()


def peak_hbm(name: str) -> float | None:
    return next((bw for key, bw in PEAK_HBM.items() if key in name), None)


def make_timer(device, repeats):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100) / 1e3

    def timed(fn):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    return timed


def copy_bandwidth(timer) -> float:
    """Bytes/s (read + written) of a 2 GiB device-to-device copy: what the card really sustains."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def main():
    args = parse_args()
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MADAKV_FORCE_TRITON"] = "1"
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import madakv_kernels as mk
    from _stamp import stamp, write_results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    lengths = [512, 2048] if args.quick else args.lengths or ([8192, 32768, 131072] if device == "cuda"
                                                              else [2048, 8192, 32768])
    timer = make_timer(device, 3 if (args.quick or device == "cpu") else 20)
    num_q, num_kv, head_dim, window = 28, 4, 128, 32
    block_size = 16 if device == "cuda" else 128
    layout = "NHD" if device == "cuda" else "HND"
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_hbm(gpu) if gpu else None
    copy_bw = copy_bandwidth(timer) if device == "cuda" else None
    if gpu:
        print(f"{gpu}: datasheet HBM {peak / 1e9 if peak else float('nan'):.0f} GB/s, "
              f"measured copy {copy_bw / 1e9:.0f} GB/s", flush=True)

    # name -> (scoring fn, compaction fn); on CUDA also the fp32 "ieee" scoring the tensor-core one replaces.
    impls = {"torch": (mk.window_scores_torch, mk.compact_kv_torch)}
    if device == "cuda" or args.triton_interpret:
        impls["triton"] = (mk.window_scores_triton, mk.compact_kv_triton)
    if device == "cuda" and dtype != torch.float32:
        impls["triton-fp32dot"] = (lambda *a: mk.window_scores_triton(*a, tensor_cores=False), mk.compact_kv_triton)
    elt = torch.empty(0, dtype=dtype).element_size()

    def setup(n):
        blocks = math.ceil(n / block_size)
        kept = max(window, n // 5)
        dst_blocks = math.ceil(kept / block_size)
        shape = (blocks + dst_blocks, block_size, num_kv, head_dim)
        if layout == "HND":
            shape = (shape[0], num_kv, block_size, head_dim)
        keys = torch.randn(shape, device=device).to(dtype)
        values = torch.randn(shape, device=device).to(dtype)
        src = torch.randperm(blocks, device=device).int()  # scattered, as in a real pool
        dst = torch.arange(blocks, blocks + dst_blocks, dtype=torch.int32, device=device)
        queries = torch.randn(window, num_q, head_dim, device=device).to(dtype)
        keep = torch.stack([torch.randperm(n, device=device)[:kept].sort().values for _ in range(num_kv)]).int()
        return keys, values, src, dst, queries, keep, kept

    tuning = []
    if device == "cuda" and not args.no_tune:  # pick tile sizes at the longest context, then use them everywhere
        tune_n = max(lengths)
        keys, values, src, dst, queries, keep, kept = setup(tune_n)
        for block_r, block_n, warps in [(128, 32, 4), (256, 32, 8), (128, 64, 4), (256, 64, 8), (128, 128, 8),
                                        (256, 32, 4), (64, 64, 4)]:
            t = timer(lambda: mk.window_scores_triton(keys, src, queries, tune_n, layout, block_r=block_r,
                                                      block_n=block_n, num_warps=warps))
            tuning.append(dict(kernel="score", n=tune_n, block_r=block_r, block_n=block_n, num_warps=warps, ms=t * 1e3))
        for block_t, warps in [(64, 4), (128, 4), (128, 8), (256, 8)]:
            t = timer(lambda: mk.compact_kv_triton(keys, values, src, dst, keep, layout, block_t=block_t,
                                                   num_warps=warps))
            tuning.append(dict(kernel="compact", n=tune_n, block_t=block_t, num_warps=warps, ms=t * 1e3))
        for row in tuning:
            print("tune", row, flush=True)
        best_s = min((r for r in tuning if r["kernel"] == "score"), key=lambda r: r["ms"])
        best_c = min((r for r in tuning if r["kernel"] == "compact"), key=lambda r: r["ms"])
        s_kw = dict(block_r=best_s["block_r"], block_n=best_s["block_n"], num_warps=best_s["num_warps"])
        c_kw = dict(block_t=best_c["block_t"], num_warps=best_c["num_warps"])
        print(f"chosen: score {s_kw}, compact {c_kw}", flush=True)
        impls["triton"] = (functools.partial(mk.window_scores_triton, **s_kw),
                           functools.partial(mk.compact_kv_triton, **c_kw))
        if "triton-fp32dot" in impls:
            impls["triton-fp32dot"] = (functools.partial(mk.window_scores_triton, tensor_cores=False, **s_kw),
                                       impls["triton"][1])

    rows = []
    for n in lengths:
        keys, values, src, dst, queries, keep, kept = setup(n)
        key_bytes = n * num_kv * head_dim * elt
        moved_bytes = 2 * 2 * kept * num_kv * head_dim * elt
        for name, (score, compact) in impls.items():
            t_score = timer(lambda: score(keys, src, queries, n, layout))
            t_compact = timer(lambda: compact(keys, values, src, dst, keep, layout))
            row = dict(impl=name, n=n, kept=kept, score_ms=t_score * 1e3, score_gbps=key_bytes / t_score / 1e9,
                       compact_ms=t_compact * 1e3, compact_gbps=moved_bytes / t_compact / 1e9)
            if name.startswith("triton"):
                row["score_moved_gbps"] = 2 * key_bytes / t_score / 1e9
            if peak:
                row["score_pct_peak"] = 100 * row["score_gbps"] * 1e9 / peak
                row["compact_pct_peak"] = 100 * row["compact_gbps"] * 1e9 / peak
            rows.append(row)
            pct = (f" ({row['score_pct_peak']:5.1f} % peak)" if peak else "")
            cpct = (f" ({row['compact_pct_peak']:5.1f} % peak)" if peak else "")
            print(f"{name:15s} N={n:7d}  score {row['score_ms']:9.3f} ms {row['score_gbps']:8.1f} GB/s{pct}   "
                  f"compact {row['compact_ms']:8.3f} ms {row['compact_gbps']:8.1f} GB/s{cpct}", flush=True)
    result = dict(stamp=stamp(), device=device, gpu=gpu, peak_hbm_gbps=peak / 1e9 if peak else None,
                  copy_gbps=copy_bw / 1e9 if copy_bw else None, dtype=args.dtype, layout=layout,
                  block_size=block_size, heads=dict(q=num_q, kv=num_kv, head_dim=head_dim), window=window,
                  tuning=tuning, rows=rows)

    write_results(args.out, result, draw)


def draw(plt, result: dict):
    """kernels.png from kernels.json: time of scoring and of compaction per implementation vs
    context (log-log, each time written next to its point), the same numbers as the tables."""
    from _stamp import label_points

    impls = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    lengths = sorted({r["n"] for r in result["rows"]})
    heads = result["heads"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, title in ((axes[0], "score_ms", "window scoring"),
                              (axes[1], "compact_ms", "compaction of 20 % (K+V)")):
        for i, name in enumerate(impls):
            if metric == "compact_ms" and name == "triton-fp32dot":  # the same compaction kernel as "triton"
                continue
            pts = sorted((r["n"], r[metric]) for r in result["rows"] if r["impl"] == name)
            ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
            label_points(ax, *zip(*pts), fmt="{} ms", color=f"C{i}", offset=(0, -13 if i == 1 else 7),
                         values=[f"{ms:.3f}" if ms < 1 else f"{ms:.3g}" for _, ms in pts])  # as the tables
        ax.set(xscale="log", yscale="log", xlabel="context tokens (one layer of one request)", ylabel="ms (log)",
               title=f"{title}, {result['dtype']}, {result.get('gpu') or 'CPU'}")
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.margins(x=0.12, y=0.2)
        ax.legend(fontsize=7, title=f"{heads['q']}/{heads['kv']} heads, head_dim {heads['head_dim']}, "
                                    f"window {result['window']}", title_fontsize=7)
    return fig


if __name__ == "__main__":
    main()
