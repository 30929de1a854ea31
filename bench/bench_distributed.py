"""Data-parallel overhead: the demo trained by 1 rank and by 2 local ranks (mlx.launch -n 2, ring).

    python bench/bench_distributed.py [--iters 8] [--rounds 1]

Both runs train the demo config (SmolLM2-135M, rank 8 on all 7 projections of 30 blocks) with
the same global batch (4), in turns, `--rounds` times each, through `run.run_training` with a
world whose `time_all_reduce` is on: every optimizer step evaluates the rank's gradient, waits
for the other rank (a barrier), then times `mlx.nn.average_gradients` with `mx.eval` around it.
That needs `training.compile=false`, so both runs train uncompiled. Reported per configuration:
tokens/s over the steps after the first report (start-up excluded), the step time, and for 2
ranks the measured all-reduce time per step (median over the same steps) and its share of a step.

On one machine the two ranks share its cores, so 2 ranks cannot be faster than 1: the point
is the cost of the communication, not a speed-up. Across Macs the README computes the
expected speed-up from the gradient size and the link's bandwidth (`--estimate` prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# (hidden, kv width, intermediate, layers) of models people fine-tune on Macs, from their config.json.
MODELS = {
    "SmolLM2-135M (demo)": (576, 192, 1536, 30),
    "Llama-3.2-3B": (3072, 1024, 8192, 28),
    "Llama-3.1-8B": (4096, 1024, 14336, 32),
}
LINKS_GBYTES_S = {"Thunderbolt bridge (assumed 20 Gb/s TCP)": 2.5, "10 Gb Ethernet": 1.15,
                  "1 Gb Ethernet": 0.115}


def lora_parameters(hidden: int, kv: int, intermediate: int, layers: int, rank: int) -> int:
    """LoRA parameters on all 7 projections: rank * (in + out) per projection (A is in x r, B is r x out)."""
    in_out = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
              "gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}
    return layers * sum(rank * (a + b) for a, b in (in_out[p] for p in PROJECTIONS))


def estimate() -> None:
    """Print gradient size and ring all-reduce time per step (2 hosts: each sends and receives the gradient once)."""
    print("| model | rank | gradient (float32) | " + " | ".join(LINKS_GBYTES_S) + " |")
    print("|---|---|---|" + "---|" * len(LINKS_GBYTES_S))
    for name, dims in MODELS.items():
        for rank in (8, 16):
            size = lora_parameters(*dims, rank) * 4
            # Ring all-reduce over N hosts moves 2 (N-1)/N x size per host; N = 2 gives 1 x size.
            times = [f"{size / (gbs * 1e9) * 1e3:.0f} ms" for gbs in LINKS_GBYTES_S.values()]
            print(f"| {name} | {rank} | {size / 1e6:.1f} MB | " + " | ".join(times) + " |")


REPORT_EVERY = 4


def demo_overrides(out: Path, iters: int) -> list[str]:
    return [f"output_dir={out}", f"training.iters={iters}", f"training.steps_per_report={REPORT_EVERY}",
            "training.steps_per_eval=0", "training.save_every=0", "training.compile=false", "eval.enabled=false"]


def train_worker(out: str, iters: int) -> None:
    """One rank (or the single process) of a timed demo run; rank 0 writes all_reduce_s.json."""
    from mlx_lora import distributed
    from mlx_lora.config import load_config
    from mlx_lora.run import run_training

    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), demo_overrides(Path(out), iters))
    world = distributed.init("ring", cfg.distributed.timeout_s)  # a world of one when not under mlx.launch
    world.time_all_reduce = True
    run_training(cfg, world=world)
    if world.is_main:
        (Path(out) / "all_reduce_s.json").write_text(json.dumps(world.all_reduce_s))


def run_training(ranks: int, iters: int, out: Path) -> dict:
    """tokens/s, step time and all-reduce times of one demo training run, after the first report."""
    from mlx_lora.blas import preload_command_env

    worker = [sys.executable, str(Path(__file__).resolve()), "--train-worker", str(out), str(iters)]
    if ranks > 1:
        worker = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", str(ranks), "--", *worker]
    env = {**(preload_command_env() or os.environ), "PYTHONPATH": str(ROOT)}  # the BLAS `mlx-lora train` uses
    done = subprocess.run(worker, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"training with {ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in timed)
    all_reduce = json.loads((out / "all_reduce_s.json").read_text())[REPORT_EVERY:]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "step_s": seconds / (REPORT_EVERY * len(timed)),
            "all_reduce_s": statistics.median(all_reduce) if all_reduce else 0.0,
            "final_loss": rows[-1]["train_loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--estimate", action="store_true", help="print the computed multi-Mac table and exit")
    parser.add_argument("--train-worker", nargs=2, metavar=("OUT", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        train_worker(args.train_worker[0], int(args.train_worker[1]))
        return 0
    if args.estimate:
        estimate()
        return 0
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for ranks in (1, 2):
                runs[ranks].append(run_training(ranks, args.iters, Path(tmp) / f"r{round_}-{ranks}"))
        import mlx.core as mx

        gradient_bytes = sum(v.nbytes for v in mx.load(str(Path(tmp) / "r0-1" / "adapters.safetensors")).values())
    one, two = (max(runs[n], key=lambda r: r["tokens_per_s"]) for n in (1, 2))
    print(f"machine: {os.cpu_count()} cores shared by both ranks (and by other work; compare within this run)")
    print("| ranks | tokens/s (best of rounds) | step | gradient all-reduce per step | share of the step | vs 1 rank |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 | {one['tokens_per_s']:.1f} | {one['step_s']:.2f} s | none | - | 1.00 |")
    print(f"| 2 (local, ring) | {two['tokens_per_s']:.1f} | {two['step_s']:.2f} s | {two['all_reduce_s'] * 1e3:.1f} ms "
          f"({gradient_bytes / 1e6:.1f} MB float32) | {two['all_reduce_s'] / two['step_s']:.1%} | "
          f"{two['tokens_per_s'] / one['tokens_per_s']:.2f} |")
    print(f"final train loss: 1 rank {one['final_loss']:.6f}, 2 ranks {two['final_loss']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
