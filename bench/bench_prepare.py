"""Benchmark of data_transform.py: convert N short chat rows (default 1M, ~200 MB of JSONL).

Run: `python bench/bench_prepare.py [--rows 1000000] [--keep DIR]`. The input is generated in a
temporary folder, the converter runs in a subprocess, and the script prints its wall time and
peak resident memory (getrusage of the child). Target on the 2-core dev box: < 60 s, < 500 MB.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("date", "convert", "please", "format", "answer", "the", "a", "of", "to", "in", "model", "train",
         "what", "is", "this", "ISO", "year", "month", "day", "number", "write", "short", "reply", "text")


def make_input(path: Path, rows: int, seed: int = 0) -> int:
    """Write `rows` distinct short chats (system, user, assistant) to `path`; returns its size in bytes."""
    rng = random.Random(seed)
    encode = json.JSONEncoder(ensure_ascii=False).encode
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            user = " ".join(rng.choices(WORDS, k=9)) + f" #{i}"
            reply = " ".join(rng.choices(WORDS, k=6))
            row = {"messages": [{"role": "system", "content": "You are a concise assistant."},
                                {"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
            handle.write(encode(row) + "\n")
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="Folder to generate into and keep (default: a temporary one).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "chats.jsonl"
        started = time.perf_counter()
        size = make_input(source, args.rows)
        print(f"generated {args.rows:,} rows, {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s")
        command = [sys.executable, str(ROOT / "data_transform.py"), str(source), "-o", str(folder / "out"), "--force", "-q"]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT)
        wall = time.perf_counter() - started
        # ru_maxrss is the peak of the largest child waited for: kilobytes on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak_mb = peak / 1e6 if sys.platform == "darwin" else peak / 1024
        if result.returncode:
            print(f"converter failed with exit code {result.returncode}")
            return result.returncode
        counts = {s: sum(1 for _ in open(folder / "out" / f"{s}.jsonl", "rb")) for s in ("train", "valid", "test")}
        print(f"command: {' '.join(command)}")
        print(f"converted {args.rows:,} rows ({size / 1e6:.0f} MB): wall {wall:.1f} s, peak RSS {peak_mb:.0f} MB; splits {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
