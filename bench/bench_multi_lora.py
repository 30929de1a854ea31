"""Micro-benchmark: the per-row adapter term of MultiLoRALinear, gather (`mx.gather_mm`) vs grouping rows.

    python bench/bench_multi_lora.py                 # SmolLM2-135M's q_proj shape, rank 8
    python bench/bench_multi_lora.py --dims 576 1536 --rank 16 --rows 8 --adapters 4

Prints ms per call (median of --repeats, each --calls calls evaluated together) for decode
(1 token per row) and prefill (--prefill tokens per row). Not a test: a comparison to pick one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora.serve.multi_lora import MultiLoRALinear, RowAdapters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs=2, default=[576, 576], metavar=("IN", "OUT"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    in_dims, out_dims = args.dims
    rows = RowAdapters()
    layer = MultiLoRALinear(nn.Linear(in_dims, out_dims, bias=False), rows)
    for slot in range(1, args.adapters + 1):
        layer.put(slot, mx.random.normal((in_dims, args.rank)) * 0.02, mx.random.normal((args.rank, out_dims)) * 0.02, 2.0)
    slots = [1 + i % args.adapters for i in range(args.rows)]
    print(f"| strategy | tokens/row | ms per call (in={in_dims}, out={out_dims}, rank={args.rank}, "
          f"{args.rows} rows over {args.adapters} adapters) |\n|---|---|---|")
    for length in (1, args.prefill):
        x = mx.random.normal((args.rows, length, in_dims))
        results = {}
        for strategy in ("gather", "group"):
            rows.strategy = strategy
            rows.set(slots)
            results[strategy] = layer(x)
            mx.eval(results[strategy])
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                mx.eval([layer(x) for _ in range(args.calls)])
                times.append((time.perf_counter() - start) / args.calls * 1e3)
            print(f"| {strategy} | {length} | {statistics.median(times):.3f} |")
        gap = mx.abs(results["gather"] - results["group"]).max().item()
        print(f"(max |gather - group| = {gap:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
