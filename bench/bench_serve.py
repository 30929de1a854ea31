"""Benchmark: this server against `mlx_lm.server` under concurrent streaming load, and a 4-adapter mix.

    python bench/bench_serve.py                       # fused demo run (runs/demo/fused, fused if missing)
    python bench/bench_serve.py --model runs/demo/fused --clients 1,4,8 --requests 3 --json bench/serve.json

On the CPU give it a float32 folder (`mlx-lora fuse --dtype float32`): mlx_lm.server computes in
the folder's dtype and MLX's CPU float16 matmul has no BLAS behind it, while this server widens
to float32 at load; a float32 folder runs both at their best.

For each server (both with their batching on; mlx_lm.server batches by default): N concurrent
clients (1, 4, 8) each send `--requests` streamed greedy chat requests of `--max-tokens` tokens,
one after another. Reported per N: aggregate generated tokens/s (usage's completion tokens over wall time),
p50 / p95 request latency, p50 time to first token, errors. Then 8 clients spread over 4 adapters
(random LoRA adapters made for the model, rank 8): on this server by model name in one batch,
on mlx_lm.server by its per-request `adapters` path (it reloads on every switch), next to the same
8 clients on one adapter. Both servers are started, each at its own settings, then take turns:
every load runs `--rounds` times per server (adapter loads `--adapter-rounds`), alternating
servers and flipping the order each round; within a round each server runs its loads back to back
(1 then 8 clients, or 8 then 1; one adapter and the mix likewise), so a slow stretch of a shared
machine falls on both servers and on both sides of a within-server ratio. It prints each round,
the paired per-round ratios (across servers; within each: 8 / 1 clients, the mix / one adapter),
and per server the median of its rounds.
Not a test: it prints tables (and JSON) to paste into the README.
"""

from __future__ import annotations

import argparse
import json
import os
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


def server_command(kind: str, model: str, port: int, adapters: dict[str, str]) -> list[str]:
    if kind == "mlx-lora":
        command = [sys.executable, "-m", "mlx_lora", "serve", "--model", model, "--port", str(port),
                   "--max-tokens", "4096", "--max-batch", "8"]
        for name, folder in adapters.items():
            command += ["--adapter", f"{name}={folder}"]
        return command
    return [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port)]


def start(kind: str, model: str, port: int, adapters: dict[str, str]) -> subprocess.Popen:
    from mlx_lora.blas import blas_env, find_fast_blas

    env = dict(os.environ)
    blas = find_fast_blas()
    if blas and sys.platform.startswith("linux"):
        env.update(blas_env(blas))  # both servers get the same fast BLAS, its kernels fit to this CPU
    # The log goes to a file: a pipe nobody reads fills up and blocks the server mid-request.
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{kind}-", suffix=".log", delete=False)
    proc = subprocess.Popen(server_command(kind, model, port, adapters), env=env, stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    proc.log_path = log.name
    deadline = time.monotonic() + 600
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
    raise RuntimeError(f"{kind} did not start within 600 s")


def stream_once(url: str, body: dict) -> dict:
    """One streamed request: latency, time to first token, tokens, or the error. Tokens are the
    final usage chunk's `completion_tokens` (`stream_options.include_usage`, both servers send it):
    content chunks undercount, as a streaming detokenizer sends a word's tokens in one chunk."""
    start = time.perf_counter()
    times, usage = [], None
    try:
        with requests.post(url + "/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                           stream=True, timeout=1800) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"].get("message", "error")}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
    except requests.RequestException as err:
        return {"error": type(err).__name__}
    if not times:
        return {"error": "no tokens"}
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else len(times)
    return {"latency_s": time.perf_counter() - start, "ttft_s": times[0] - start, "tokens": tokens, "chunks": len(times)}


def load(url: str, bodies: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn (client i uses bodies[i % len])."""
    def client(i: int) -> list[dict]:
        return [stream_once(url, bodies[i % len(bodies)]) for _ in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    latencies = sorted(r["latency_s"] for r in ok)
    pick = lambda q, xs: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_kinds": sorted({r["error"] for r in results if "error" in r}), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "p50_s": pick(0.5, latencies),
            "p95_s": pick(0.95, latencies), "ttft_p50_s": pick(0.5, sorted(r["ttft_s"] for r in ok))}


def make_adapters(model: str, folder: Path, count: int) -> dict[str, str]:
    """`count` random rank-8 LoRA adapters (every projection, random B) for `model`, saved under `folder`."""
    import mlx.core as mx

    from mlx_lora.adapters import adapter_config, save_adapters
    from mlx_lora.config import LoraConfig
    from mlx_lora.lora import apply_lora, lora_layers
    from mlx_lora.models import load_model

    adapters = {}
    for i in range(count):
        out = folder / f"adapter{i}"
        if not (out / "adapters.safetensors").is_file():
            loaded, _, _ = load_model(model)
            lora = LoraConfig(rank=8, alpha=16)
            keys = apply_lora(loaded, lora)
            mx.random.seed(i)
            for _, layer in lora_layers(loaded):
                layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
            save_adapters(out, loaded, adapter_config(lora, keys, len(loaded.layers), {"model": model}))
        adapters[f"adapter{i}"] = str(out)
    return adapters


class Server:
    """One started server and the request bodies for each load mix."""

    def __init__(self, kind: str, model: str, adapters: dict[str, str], max_tokens: int):
        from mlx_lora.serve.app import free_port

        self.kind, self.port = kind, free_port()
        self.proc = start(kind, model, self.port, adapters if kind == "mlx-lora" else {})
        self.url = f"http://127.0.0.1:{self.port}/v1"
        base = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0}
        # mlx_lm.server answers for the model it was started with when a request names its path
        name = requests.get(self.url + "/models", timeout=10).json()["data"][0]["id"] if kind == "mlx-lora" else model
        stream_once(self.url, {**base, "model": name, "max_tokens": 8})  # warm-up
        self.mixes = {"base": [{**base, "model": name}]}
        if adapters:
            if kind == "mlx-lora":
                self.mixes["1 adapter"] = [{**base, "model": "adapter0"}]
                self.mixes[f"{len(adapters)} adapters"] = [{**base, "model": n} for n in adapters]
            else:
                self.mixes["1 adapter"] = [{**base, "model": model, "adapters": adapters["adapter0"]}]
                self.mixes[f"{len(adapters)} adapters"] = [{**base, "model": model, "adapters": path}
                                                           for path in adapters.values()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        os.unlink(self.proc.log_path)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def bench_all(kinds: list[str], model: str, adapters: dict[str, str], args) -> list[dict]:
    """Every server started at once (idle ones cost nothing), then rounds: in each round every server
    in turn runs a block of loads back to back (the base model at each client count; then, in the
    adapter rounds, one adapter and the mix), the order of the servers and of the loads within a block
    flipped every round, so a slower stretch of a shared machine falls on both servers and on both
    sides of each within-server ratio. Each row is printed as it is measured; then the paired ratios
    (across servers, and within a server: most clients / one client, the mix / one adapter) and per
    server the median of its rounds."""
    servers = []
    try:
        for kind in kinds:
            servers.append(Server(kind, model, adapters, args.max_tokens))
        blocks = [([("base", clients) for clients in args.clients], args.rounds)]
        mixes = [(mix, 8) for mix in servers[0].mixes if mix != "base"]
        if mixes:
            blocks.append((mixes, args.adapter_rounds))
        rounds: dict[str, dict[tuple, list[dict]]] = {server.kind: {} for server in servers}
        for loads, count in blocks:
            for turn in range(count):
                for server in (servers if turn % 2 == 0 else servers[::-1]):
                    for mix, clients in (loads if turn % 2 == 0 else loads[::-1]):
                        run = {"mix": mix, "round": turn + 1,
                               **load(server.url, server.mixes[mix], clients, args.requests)}
                        rounds[server.kind].setdefault((mix, clients), []).append(run)
                        print_row(server.kind, run)
        results = {kind: {"server": kind, "runs": [summarize(mix, clients, runs) for (mix, clients), runs in by_load.items()]}
                   for kind, by_load in rounds.items()}
        print_ratios(rounds, args)
        print("\nmedians over rounds:")
        print(HEADER)
        for kind in results:
            for run in results[kind]["runs"]:
                print_row(kind, {**run, "round": "median"})
        return list(results.values())
    finally:
        for server in servers:
            server.stop()


def summarize(mix: str, clients: int, runs: list[dict]) -> dict:
    summary = {key: median([r[key] for r in runs if r[key] is not None] or [0.0])
               for key in ("tokens_per_s", "p50_s", "p95_s", "ttft_p50_s", "wall_s")}
    return {"mix": mix, "clients": clients, "rounds": runs, **summary,
            "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs)}


def print_ratios(rounds: dict[str, dict[tuple, list[dict]]], args) -> None:
    """Per-round tok/s ratios of loads measured in the same round: across servers, and within each."""
    def line(label: str, tops: list[dict], bottoms: list[dict]) -> None:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(tops, bottoms) if b["tokens_per_s"]]
        print(f"  {label}: " + ", ".join(f"{r:.2f}x" for r in ratios) + (f"  (median {median(ratios):.2f}x)" if ratios else ""))

    kinds = list(rounds)
    if len(kinds) == 2:
        first, second = kinds
        print(f"\npaired ratios {first} / {second} per round (same load, same round):")
        for key, runs in rounds[first].items():
            line(f"{key[1]} clients, {key[0]}", runs, rounds[second].get(key, []))
    most, fewest = max(args.clients), min(args.clients)
    print("\nwithin each server, per round (the two loads back to back):")
    for kind, by_load in rounds.items():
        if most != fewest:
            line(f"{kind}: {most} clients / {fewest} client, base", by_load[("base", most)], by_load[("base", fewest)])
        mixes = [key for key in by_load if key[0] not in ("base", "1 adapter")]
        for key in mixes:
            line(f"{kind}: {key[0]} / 1 adapter, {key[1]} clients", by_load[key], by_load[("1 adapter", key[1])])


HEADER = ("| server | round | clients | adapters | aggregate tok/s | p50 latency (s) | p95 latency (s) | "
          "p50 TTFT (s) | errors |\n|---|---|---|---|---|---|---|---|---|")


def print_row(kind: str, run: dict) -> None:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v if v is not None else "-")  # noqa: E731
    print(f"| {kind} | {run.get('round', '-')} | {run['clients']} | {run['mix']} | {fmt(run['tokens_per_s'])} | {fmt(run['p50_s'])} | "
          f"{fmt(run['p95_s'])} | {fmt(run['ttft_p50_s'])} | {run['errors']}/{run['requests']} |", flush=True)


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
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per streamed request")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--adapters", type=int, default=4, help="random adapters for the mix (0 skips it)")
    parser.add_argument("--adapter-dir", default=str(ROOT / "runs" / "bench-adapters"))
    parser.add_argument("--servers", default="mlx-lora,mlx_lm.server")
    parser.add_argument("--rounds", type=int, default=3, help="times each base-model load runs per server, servers taking turns")
    parser.add_argument("--adapter-rounds", type=int, default=1, help="the same for the adapter loads (mlx_lm.server reloads per switch: slow)")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    model = ensure_model(args.model)
    adapters = make_adapters(model, Path(args.adapter_dir), args.adapters) if args.adapters else {}
    print(f"model: {model}; {args.requests} streamed requests of {args.max_tokens} tokens per client")
    print(HEADER, flush=True)
    results = bench_all(args.servers.split(","), model, adapters, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": model, "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
