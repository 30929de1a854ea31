"""Data-parallel overhead: the demo trained by 1 rank and by 2 local ranks (mlx.launch -n 2, ring).

    python bench/bench_distributed.py [--iters 16] [--rounds 2]

Both runs train the demo config (SmolLM2-135M, rank 8 on all 7 projections of 30 blocks) with
the same global batch (4), in turns, `--rounds` times each. Reported per configuration:
tokens/s over the steps after the first report (compilation excluded), and the time of one
step's collectives, measured on their own by a 2-rank job: the gradient all-reduce
(`mlx.nn.average_gradients` over a tree with the demo adapters' shapes) plus the loss average
and the stop-flag agreement the loop also does each step.

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
import time
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


def run_training(ranks: int, iters: int, out: Path) -> tuple[float, float]:
    """(tokens/s, seconds per step) of one demo training run, after the first report."""
    command = [sys.executable, "-m", "mlx_lora", "train", str(ROOT / "configs" / "demo.yaml"),
               f"output_dir={out}", f"training.iters={iters}", f"training.steps_per_report={REPORT_EVERY}",
               "training.steps_per_eval=0", "training.save_every=0", "eval.enabled=false"]
    if ranks > 1:
        command += ["-n", str(ranks)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"training with {ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in rows)
    return sum(r["tokens"] for r in rows) / seconds, seconds / (REPORT_EVERY * len(rows))


def collectives_worker(adapters: str, repeats: int) -> None:
    """One rank of the collectives timing (run under mlx.launch -n 2)."""
    import mlx.core as mx

    from mlx_lora.distributed import init

    world = init("ring")
    grads = {k: mx.zeros_like(v) + 1 for k, v in mx.load(adapters).items()}
    loss = mx.array(1.0)
    mx.eval(grads)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        mx.eval(world.average_gradients(grads), world.average(loss))
        world.any(False)
        if i >= 3:  # the first calls set up buffers
            times.append(time.perf_counter() - start)
    if world.is_main:
        size = sum(v.nbytes for v in grads.values())
        print(json.dumps({"ms": statistics.median(times) * 1e3, "bytes": size}))


def time_collectives(adapters: Path, repeats: int = 50) -> dict:
    command = [sys.executable, str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2", "--",
               sys.executable, str(Path(__file__).resolve()), "--collectives-worker", str(adapters), str(repeats)]
    done = subprocess.run(command[1:], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"collectives timing failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--estimate", action="store_true", help="print the computed multi-Mac table and exit")
    parser.add_argument("--collectives-worker", nargs=2, metavar=("ADAPTERS", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collectives_worker:
        collectives_worker(args.collectives_worker[0], int(args.collectives_worker[1]))
        return 0
    if args.estimate:
        estimate()
        return 0
    speeds: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for ranks in (1, 2):
                speeds[ranks].append(run_training(ranks, args.iters, Path(tmp) / f"r{round_}-{ranks}"))
        collectives = time_collectives(Path(tmp) / "r0-1" / "adapters.safetensors")
    (one, one_step), (two, two_step) = (min(speeds[n], key=lambda s: -s[0]) for n in (1, 2))
    print(f"machine: {os.cpu_count()} cores shared by both ranks (and by other work; compare within this run)")
    print("| ranks | tokens/s (best of rounds) | step | vs 1 rank |")
    print("|---|---|---|---|")
    print(f"| 1 | {one:.0f} | {one_step * 1e3:.0f} ms | 1.00 |")
    print(f"| 2 (local, ring) | {two:.0f} | {two_step * 1e3:.0f} ms | {two / one:.2f} |")
    print(f"collectives per step, 2 local ranks: {collectives['ms']:.2f} ms (gradient all-reduce of "
          f"{collectives['bytes'] / 1e6:.1f} MB + loss average + stop flag) = "
          f"{collectives['ms'] / (two_step * 1e3):.1%} of a 2-rank step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
