"""Benchmark: the per-row adapter term of MultiLoRALinear, one layer and whole decode steps.

    python bench/bench_multi_lora.py                           # one layer, SmolLM2-135M's q_proj shape
    python bench/bench_multi_lora.py --dims 576 1536 --rank 16 --rows 8 --adapters 4
    python bench/bench_multi_lora.py --model /tmp/demo-f32     # whole decode steps of a real model

Layer mode: ms per call (median of --repeats, each --calls calls evaluated together) for decode
(1 token per row) and prefill (--prefill tokens per row), for each strategy of `RowAdapters`
next to the plain base and one shared adapter.

Model mode (`--model`): --rows sequences decode together through the server's `Scheduler`; the
same batch is timed with every row on one adapter, and with the rows spread over --adapters
adapters under each strategy, in alternating rounds in one process (ratios are what to read on
a shared machine). Reports the median ms per decode step and its ratio to the one-adapter batch.
Not a test: a comparison to pick one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STRATEGIES = ("gather", "stacked", "group")


def layer_bench(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora.serve.multi_lora import MultiLoRALinear, RowAdapters

    in_dims, out_dims = args.dims
    rows = RowAdapters()
    layer = MultiLoRALinear(nn.Linear(in_dims, out_dims, bias=False), rows)
    for slot in range(1, args.adapters + 1):
        layer.put(slot, mx.random.normal((in_dims, args.rank)) * 0.02, mx.random.normal((args.rank, out_dims)) * 0.02, 2.0)
    mixed = [1 + i % args.adapters for i in range(args.rows)]
    cases = [("base (no adapter)", "gather", [0] * args.rows), ("one adapter", "gather", [1] * args.rows)]
    cases += [(f"{args.adapters} adapters, {s}", s, mixed) for s in STRATEGIES]
    print(f"| rows use | tokens/row | ms per call (in={in_dims}, out={out_dims}, rank={args.rank}, {args.rows} rows) |"
          "\n|---|---|---|")
    for length in (1, args.prefill):
        x = mx.random.normal((args.rows, length, in_dims))
        times, outputs = {name: [] for name, _, _ in cases}, {}
        for _ in range(args.repeats):  # alternate the cases so drift hits them alike
            for name, strategy, slots in cases:
                rows.strategy = strategy
                rows.set(slots)
                outputs[name] = layer(x)
                mx.eval(outputs[name])
                start = time.perf_counter()
                mx.eval([layer(x) for _ in range(args.calls)])
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
        for name, _, _ in cases:
            print(f"| {name} | {length} | {statistics.median(times[name]):.3f} |")
        reference = outputs[cases[2][0]]
        gap = max(mx.abs(outputs[name] - reference).max().item() for name, _, _ in cases[2:])
        print(f"(largest difference between strategies: {gap:.2e})")


def model_bench(args) -> None:
    from bench_serve import make_adapters
    from mlx_lora.serve.engine import Engine
    from mlx_lora.serve.scheduler import Scheduler, Sequence

    folder = Path(args.adapter_dir or tempfile.mkdtemp(prefix="bench-multi-lora-"))
    adapters = make_adapters(args.model, folder, args.adapters)
    engine = Engine.from_source(args.model, adapters, base_name="base")
    slots = [engine.adapters[name].slot for name in adapters]
    prompt = list(engine.tokenizer.encode("Write a long story about a dragon who learns to bake bread."))
    mixed = [slots[i % len(slots)] for i in range(args.rows)]
    cases = [("one adapter", "gather", [slots[0]] * args.rows), ("base (no adapter)", "gather", [0] * args.rows)]
    cases += [(f"{len(slots)} adapters, {s}", s, mixed) for s in STRATEGIES]
    times = {name: [] for name, _, _ in cases}

    def run_batch(strategy: str, row_slots: list[int]) -> list[float]:
        from mlx_lm.models.cache import make_prompt_cache

        engine.rows.strategy = strategy
        sched = Scheduler(engine._forward, lambda: make_prompt_cache(engine.model), set(), max_batch=args.rows)
        for slot in row_slots:
            sched.add(Sequence(prompt=prompt, max_tokens=args.steps, on_token=lambda e: False,
                               on_finish=lambda r: None, slot=slot))
        while len(sched.running) < args.rows:  # prefill, untimed
            sched.step()
        steps = []
        while sched.running:
            start = time.perf_counter()
            sched._decode()
            steps.append((time.perf_counter() - start) * 1e3)
        return steps

    run_batch("gather", mixed)  # warm-up
    for _ in range(args.repeats):
        for name, strategy, row_slots in cases:
            times[name].extend(run_batch(strategy, row_slots))
    one = statistics.median(times[cases[0][0]])
    print(f"model {args.model}: {args.rows} rows, {args.steps} decode steps per round, {args.repeats} rounds")
    print("| rows use | ms per decode step (median) | vs one adapter |\n|---|---|---|")
    for name, _, _ in cases:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.1f} | {median / one:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs=2, default=[576, 576], metavar=("IN", "OUT"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", help="a model folder: time whole decode steps instead of one layer")
    parser.add_argument("--steps", type=int, default=16, help="model mode: decode steps per round")
    parser.add_argument("--adapter-dir", help="model mode: where the random adapters are kept (default: a temp folder)")
    args = parser.parse_args()
    if args.model:
        model_bench(args)
    else:
        layer_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
