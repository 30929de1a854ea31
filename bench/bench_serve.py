"""Benchmark: this server against `mlx_lm.server` on the same fused model, one after the other.

    python bench/bench_serve.py                       # fused demo run (runs/demo/fused, fused if missing)
    python bench/bench_serve.py --model runs/demo/fused --clients 8 --requests 20 --json bench/serve.json

Per server: decode tokens/s and time to first token of streamed greedy requests, then
`--clients` concurrent clients x `--requests` requests each: throughput, p50/p95 latency, errors.
Not a test: it prints a table (and JSON) to paste into the README.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
SHORT = [{"role": "user", "content": "Convert this date to ISO 8601: March 7, 2021"}]


def server_command(kind: str, model: str, port: int) -> list[str]:
    if kind == "mlx-lora":
        return [sys.executable, "-m", "mlx_lora", "serve", "--model", model, "--port", str(port), "--max-tokens", "4096"]
    return [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port)]


def start(kind: str, model: str, port: int) -> subprocess.Popen:
    from mlx_lora.blas import find_fast_blas

    env = dict(os.environ)
    blas = find_fast_blas()
    if blas and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = blas  # both servers get the same fast BLAS
    # The log goes to a file: a pipe nobody reads fills up and blocks the server mid-request.
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{kind}-", suffix=".log", delete=False)
    proc = subprocess.Popen(server_command(kind, model, port), env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = log.name
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {Path(proc.log_path).read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"{kind} did not start within 300 s")


def stream_once(url: str, model: str, messages: list, max_tokens: int) -> dict:
    """TTFT and decode speed of one streamed greedy request (tokens counted as content chunks)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    times = []
    with requests.post(url + "/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    ttft = times[0] - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"ttft_s": ttft, "decode_tps": decode, "tokens": len(times)}


def one_request(url: str, model: str, max_tokens: int) -> tuple[float, int, str | None]:
    start = time.perf_counter()
    try:
        response = requests.post(url + "/chat/completions", timeout=900, json={
            "model": model, "messages": SHORT, "max_tokens": max_tokens, "temperature": 0.0})
        if response.status_code != 200:
            return time.perf_counter() - start, 0, f"HTTP {response.status_code}"
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"], None
    except requests.RequestException as err:
        return time.perf_counter() - start, 0, type(err).__name__


def load_test(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: one_request(url, model, max_tokens), range(clients * per_client)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results if r[2] is None)
    pick = lambda q: latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else None  # noqa: E731
    return {"requests": len(results), "errors": sum(r[2] is not None for r in results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r[1] for r in results) / wall,
            "p50_s": pick(0.5), "p95_s": pick(0.95)}


def bench(kind: str, model: str, args) -> dict:
    from mlx_lora.serve.app import free_port

    port = free_port()
    proc = start(kind, model, port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        # mlx_lm.server answers for the model it was started with when a request names its path
        name = requests.get(url + "/models", timeout=10).json()["data"][0]["id"] if kind == "mlx-lora" else model
        stream_once(url, name, PROMPT, 8)  # warm-up
        runs = [stream_once(url, name, PROMPT, args.max_tokens) for _ in range(args.repeats)]
        result = {"server": kind, "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                  "decode_tps": statistics.median(r["decode_tps"] for r in runs),
                  "stream_tokens": runs[0]["tokens"]}
        if args.requests > 0:
            result["load"] = load_test(url, name, args.clients, args.requests, args.load_max_tokens)
        return result
    finally:
        proc.terminate()
        proc.wait(30)
        os.unlink(proc.log_path)


def ensure_model(model: str | None) -> str:
    if model:
        return model
    fused = ROOT / "runs" / "demo" / "fused"
    if not (fused / "config.json").is_file():
        if not (ROOT / "runs" / "demo" / "adapters.safetensors").is_file():
            raise SystemExit("no demo run: train it first with ./train_by_mlx.sh, or pass --model FOLDER")
        # Through the CLI, which preloads the fast BLAS: in this process the fuse check would run
        # on MLX's reference BLAS, ~40x slower.
        subprocess.run([sys.executable, "-m", "mlx_lora", "fuse", str(ROOT / "configs" / "demo.yaml")], check=True, cwd=ROOT)
    return str(fused)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="fused model folder (default: runs/demo/fused)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed decode request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="requests per client in the load test (0 skips it)")
    parser.add_argument("--load-max-tokens", type=int, default=16)
    parser.add_argument("--servers", default="mlx-lora,mlx_lm.server")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    model = ensure_model(args.model)
    results = [bench(kind, model, args) for kind in args.servers.split(",")]
    print(f"model: {model}")
    print("| server | TTFT (s) | decode tok/s | load req/s | load tok/s | p50 (s) | p95 (s) | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        load = r.get("load", {})
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v if v is not None else "-")  # noqa: E731
        print(f"| {r['server']} | {fmt(r['ttft_s'])} | {fmt(r['decode_tps'])} | {fmt(load.get('requests_per_s'))} | "
              f"{fmt(load.get('tokens_per_s'))} | {fmt(load.get('p50_s'))} | {fmt(load.get('p95_s'))} | "
              f"{load.get('errors', '-')}/{load.get('requests', '-')} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": model, "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
