"""The logic of test_mlx.py: send test prompts to an OpenAI-compatible server and score the answers.

Uses `requests` only (no MLX), so it runs against any server. Per prompt it measures latency,
time to first token (streaming) and tokens/s; with reference answers, exact-match accuracy
after whitespace normalisation (the same rule as `mlx_lora.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


class ServerDown(RuntimeError):
    """The server could not be reached at all."""


@dataclass
class PromptCase:
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    reference: Optional[str] = None
    from_pair: bool = False  # a preference pair's prompt, its reference the chosen answer


def _chosen_text(row: dict) -> Optional[str]:
    """A preference pair's chosen answer as text (a string, or the last assistant message's content)."""
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        chosen = next((m.get("content") for m in reversed(chosen) if isinstance(m, dict) and m.get("role") == "assistant"),
                      None)
    return chosen if isinstance(chosen, str) else None


@dataclass
class Result:
    index: int
    answer: str = ""
    reference: Optional[str] = None
    match: Optional[bool] = None
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    completion_tokens: int = 0
    tokens_per_s: Optional[float] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None


def normalize(text: str) -> str:
    return " ".join(text.split())


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptCase]:
    """Prompts from JSONL rows: {"messages": [...]} (a final assistant turn is the reference),
    {"prompt": ..., "completion"|"reference": ...}, a preference pair (its chosen answer is the
    reference), or a bare JSON string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
        if isinstance(row, str):
            cases.append(PromptCase(prompt=row))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            reference = row.get("reference", _chosen_text(row) if "chosen" in row else None)
            if messages[-1].get("role") == "assistant":
                reference = reference if reference is not None else messages[-1].get("content")
                messages = messages[:-1]
            cases.append(PromptCase(messages=messages, reference=reference, from_pair="chosen" in row))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            reference = row.get("reference", row.get("completion", _chosen_text(row)))
            cases.append(PromptCase(prompt=row["prompt"], reference=reference, from_pair="chosen" in row))
        else:
            raise ValueError(f"{path}:{number}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")
        if limit is not None and len(cases) >= limit:
            break
    if not cases:
        raise ValueError(f"{path}: no prompts")
    return cases


class Client:
    """A small requests-based OpenAI client that measures timings."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, timeout: float = 600.0):
        import requests

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _post(self, path: str, body: dict, stream: bool):
        import requests

        try:
            response = self.session.post(self.base_url + path, json=body, stream=stream, timeout=self.timeout)
        except requests.ConnectionError as err:
            raise ServerDown(f"cannot reach the server at {self.base_url} ({type(err).__name__}); is it running? "
                             "Start it with ./convert_and_serve.sh") from err
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RuntimeError(f"HTTP {response.status_code}: {message}")
        return response

    def models(self) -> list[str]:
        import requests

        try:
            response = self.session.get(self.base_url + "/models", timeout=30)
        except requests.ConnectionError as err:
            raise ServerDown(f"cannot reach the server at {self.base_url}; is it running? "
                             "Start it with ./convert_and_serve.sh") from err
        if response.status_code != 200:
            raise RuntimeError(f"GET /models: HTTP {response.status_code}: {response.text[:200]}")
        return [m["id"] for m in response.json()["data"]]

    def run(self, case: PromptCase, model: str, max_tokens: int, stream: bool, index: int = 0) -> Result:
        """Send one prompt; errors other than a down server are recorded in the Result."""
        chat = case.messages is not None
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
        body.update({"messages": case.messages} if chat else {"prompt": case.prompt})
        if stream:
            body["stream_options"] = {"include_usage": True}
        result = Result(index=index, reference=case.reference)
        start = time.perf_counter()
        try:
            response = self._post("/chat/completions" if chat else "/completions", body, stream)
            if stream:
                parts = []
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"].get("message", "stream error"))
                    if chunk.get("usage"):
                        result.completion_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                        if text:
                            if result.ttft_s is None:
                                result.ttft_s = time.perf_counter() - start
                            parts.append(text)
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                result.answer = "".join(parts)
            else:
                data = response.json()
                choice = data["choices"][0]
                result.answer = choice["message"]["content"] if chat else choice["text"]
                result.finish_reason = choice["finish_reason"]
                result.completion_tokens = data["usage"]["completion_tokens"]
        except ServerDown:
            raise
        except Exception as err:  # noqa: BLE001 - one failed prompt is reported, not fatal
            result.error = str(err)
        result.latency_s = time.perf_counter() - start
        decode_time = result.latency_s - (result.ttft_s or 0.0)
        if result.completion_tokens and decode_time > 0:
            result.tokens_per_s = result.completion_tokens / decode_time
        if case.reference is not None and result.error is None:
            result.match = normalize(result.answer) == normalize(case.reference)
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    latencies = [r.latency_s for r in ok]
    scored = [r for r in ok if r.match is not None]
    summary = {"prompts": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
               "requests_per_s": len(results) / wall_s if wall_s > 0 else None}
    if latencies:
        summary.update({"latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
                        "latency_mean_s": statistics.mean(latencies)})
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    if ttfts:
        summary["ttft_mean_s"] = statistics.mean(ttfts)
    speeds = [r.tokens_per_s for r in ok if r.tokens_per_s]
    if speeds:
        summary["tokens_per_s_mean"] = statistics.mean(speeds)
    summary["completion_tokens"] = sum(r.completion_tokens for r in ok)
    if scored:
        summary["exact_match"] = sum(r.match for r in scored) / len(scored)
        summary["scored"] = len(scored)
    return summary


def run_all(client: Client, cases: list[PromptCase], model: str, max_tokens: int, stream: bool,
            concurrency: int, on_result=None) -> tuple[list[Result], float]:
    """Send every case (up to `concurrency` at once); results in input order, and the wall time."""
    start = time.perf_counter()
    results: list[Result] = [None] * len(cases)  # type: ignore[list-item]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(client.run, case, model, max_tokens, stream, i) for i, case in enumerate(cases)]
        for future in futures:
            result = future.result()
            results[result.index] = result
            if on_result is not None:
                on_result(cases[result.index], result)
    return results, time.perf_counter() - start


def default_prompts_file() -> Path:
    """The demo config's test split."""
    from ..cli import _default_config
    from ..config import load_config

    return Path(load_config(_default_config()).data.path) / "test.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test_mlx.py", description="Send test prompts to an OpenAI-compatible "
                                     "server (./convert_and_serve.sh) and score the answers.")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--prompts", help="JSONL of chat messages or prompts with optional references "
                                          "(default: the test split of --config)")
    parser.add_argument("--config", help="training config whose test split is the default prompts (default: configs/demo.yaml)")
    parser.add_argument("--model", help="model id (default: the server's default, the first it lists; the others "
                                         "are named when there are several)")
    parser.add_argument("--stream", action="store_true", help="stream answers (measures time to first token)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--limit", type=int, help="send only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", help="Bearer key (default: $MLX_LORA_API_KEY)")
    parser.add_argument("--json", dest="json_out", help="write every result and the summary to this file")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def _show(case: PromptCase, result: Result) -> None:
    prompt = case.prompt if case.messages is None else case.messages[-1].get("content", "")
    print(f"[{result.index + 1}] {prompt!s:.200}")
    if result.error:
        print(f"    ERROR: {result.error}")
        return
    mark = "" if result.match is None else ("  [match]" if result.match else f"  [expected: {result.reference!s:.120}]")
    ttft = f", ttft {result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else ""
    speed = f", {result.tokens_per_s:.1f} tok/s" if result.tokens_per_s else ""
    print(f"    -> {result.answer!s:.300}{mark}")
    print(f"    {result.latency_s:.2f} s{ttft}{speed}, {result.completion_tokens} tokens, {result.finish_reason}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of test_mlx.py; returns the exit code (1 when the server is down or every prompt failed)."""
    import os

    args = build_parser().parse_args(argv)
    try:
        if args.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if args.prompts:
            prompts_file = Path(args.prompts)
        elif args.config:
            from ..config import load_config

            prompts_file = Path(load_config(args.config).data.path) / "test.jsonl"
        else:
            prompts_file = default_prompts_file()
        cases = read_prompts(prompts_file, args.limit)
        client = Client(args.base_url, args.api_key or os.environ.get("MLX_LORA_API_KEY"))
        listed = [] if args.model else client.models()
        model = args.model or listed[0]
        print(f"{len(cases)} prompts from {prompts_file} -> {model} at {args.base_url}"
              f"{' (streaming)' if args.stream else ''}, concurrency {args.concurrency}")
        if any(case.from_pair for case in cases):
            print("note: preference pairs: each answer is compared with its pair's chosen answer (exact match)")
        if len(listed) > 1:  # the server's default (listed first); say so, as the others may be what was meant
            print(f"note: {model} is the server's default model; it also serves {', '.join(listed[1:])} "
                  "(pass --model NAME to score one of those)")
        results, wall = run_all(client, cases, model, args.max_tokens, args.stream, args.concurrency,
                                None if args.quiet else _show)
    except ServerDown as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = summarize(results, wall)
    print("summary:")
    for key, value in summary.items():
        print(f"  {key:18s} {value:.3f}" if isinstance(value, float) else f"  {key:18s} {value}")
    if "exact_match" in summary:
        print(f"exact match: {100 * summary['exact_match']:.1f}% ({summary['scored']} with references)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": model, "summary": summary,
                                                   "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return 1 if summary["errors"] == len(results) else 0
