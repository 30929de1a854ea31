"""Starting data-parallel runs: the hosts file, the `mlx.launch` command, and the checks that
every host holds the same kit, model and data.

The networking is MLX's own (`mlx.launch` starts one process per host over ssh and wires the
ring, JACCL or MPI backend); this module only reads the hosts file, refuses bad ones with one
line each, and compares a fingerprint of the inputs across ranks before any training step
(`check_same_inputs`). `python -m mlx_lora.launch check CONFIG` is what `mlx-lora doctor
--hosts` runs on every host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOCAL_NAMES = ("127.0.0.1",)  # the names mlx.launch runs without ssh
FULL_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed whole; larger: size + first and last 4 MiB
EDGE_BYTES = 4 * 2**20
SSH_TIMEOUT_S = 8
ENGINES = {"ring": "ring", "jaccl": "jaccl", "mpi": "mpi"}  # distributed.backend -> mlx.launch --backend


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...]


def read_hosts(path: str | Path, backend: str = "any") -> list[Host]:
    """The hosts of an `mlx.launch` hosts file; ValueError naming the file, entry and fix.

    Format (MLX's): `{"backend": ..., "hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, ...]}`
    or just the list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--hosts {path}: file not found (a JSON list of {{\"ssh\": NAME, \"ips\": [IP]}}; "
                                "see the README's two-Mac walk-through)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from err
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of hosts (or {{\"hosts\": [...]}}), got {type(entries).__name__}")
    hosts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str) or not entry["ssh"]:
            raise ValueError(f"{path}: hosts[{i}] needs an \"ssh\" name, e.g. {{\"ssh\": \"mac2.local\", \"ips\": [\"10.0.0.2\"]}}")
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"{path}: hosts[{i}] ({entry['ssh']}): \"ips\" must be a list of addresses")
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as err:
                raise ValueError(f"{path}: hosts[{i}] ({entry['ssh']}): {ip!r} is not an IP address") from err
        if backend == "ring" and not ips:
            raise ValueError(f"{path}: hosts[{i}] ({entry['ssh']}): the ring backend needs \"ips\" (the address "
                             "the other Macs reach it on, e.g. its Thunderbolt bridge IP)")
        hosts.append(Host(entry["ssh"], tuple(ips)))
    return hosts


def check_reachable(hosts: list[Host], path: str | Path) -> None:
    """Raise ValueError naming the first host that ssh cannot log into without a password."""
    for host in hosts:
        if host.ssh in LOCAL_NAMES:
            continue
        try:
            done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host.ssh, "true"],
                                  capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 5)
            reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1] if done.returncode else ""
        except FileNotFoundError:
            reason = "no ssh client on this machine"
        except subprocess.TimeoutExpired:
            reason = f"no answer within {SSH_TIMEOUT_S + 5}s"
        if reason:
            raise ValueError(f"{path}: host {host.ssh} is unreachable over ssh ({reason}); check the name and that "
                             "Remote Login is on and your key is in its ~/.ssh/authorized_keys")


def launch_command(rank_argv: list[str], processes: int | None, hosts_file: str | None, backend: str) -> list[str]:
    """The `mlx.launch` command that runs `python -m mlx_lora RANK_ARGV` once per rank."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    launcher = str(launcher) if launcher.is_file() else shutil.which("mlx.launch")
    if launcher is None:
        raise FileNotFoundError("mlx.launch not found next to this Python or on PATH; install mlx (pip install mlx)")
    command = [launcher]
    if backend in ENGINES:
        command += ["--backend", ENGINES[backend]]
    command += ["--hostfile", str(hosts_file)] if hosts_file else ["-n", str(processes)]
    return command + ["--", sys.executable, "-m", "mlx_lora", *rank_argv]


RANK_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def run_launcher(command: list[str], stream=None) -> int:
    """Run `mlx.launch`, relaying its output, and return 0 only if every rank exited with 0.

    mlx.launch itself exits 0 even when ranks failed; it does print one line per failed rank,
    which is what this reads. Ctrl-C is left to the ranks (each stops with a checkpoint), so
    the caller should ignore SIGINT before calling.
    """
    stream = stream or sys.stderr
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    failed: dict[int, int] = {}
    tail = ""
    while chunk := os.read(process.stderr.fileno(), 8192):
        text = chunk.decode(errors="replace")
        stream.write(text)
        stream.flush()
        tail = (tail + text)[-4096:]
        for match in RANK_EXIT.finditer(tail):
            failed[int(match.group(1))] = int(match.group(2) or -9)
        tail = tail[tail.rfind("\n") + 1:]
    process.wait()
    if process.returncode:
        return process.returncode
    if not failed:
        return 0
    # Ctrl-C: every rank exits with 130, except those the launcher terminated (-15) when the
    # first of them was done; that is still an interrupted run, not a failed one.
    codes = set(failed.values())
    return 130 if 130 in codes and codes <= {130, -15} else 1


# --- the same kit, model and data everywhere ----------------------------------------------------

def file_digest(path: Path) -> str:
    """sha256 of a file, whole up to FULL_HASH_LIMIT, else of its size and first and last EDGE_BYTES."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def tree_digest(path: str | Path) -> str:
    """A digest of a file or of every visible file under a folder (names and contents)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file():
        return file_digest(path)[:16]
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)):
        digest.update(f"{item.relative_to(path)}\0{file_digest(item)}\0".encode())
    return digest.hexdigest()[:16]


def fingerprint(model_path: str | Path, data_path: str | Path) -> dict:
    """What must be equal on every host: versions, model files, data files."""
    import mlx.core as mx

    from . import __version__

    return {"host": socket.gethostname(), "mlx-lora": __version__, "mlx": mx.__version__,
            "model": tree_digest(model_path), "data": tree_digest(data_path),
            "model_path": str(model_path), "data_path": str(data_path)}


FIXES = {"mlx-lora": "install the same mlx-lora on every host", "mlx": "install the same mlx on every host",
         "model": "copy the same model files to every host", "data": "copy the same data folder to every host"}


def compare_fingerprints(prints: list[dict]) -> list[str]:
    """One problem per (rank, item) that differs from rank 0, naming the host and the fix."""
    problems = []
    reference = prints[0]
    for rank, other in enumerate(prints[1:], 1):
        for key, fix in FIXES.items():
            if other[key] != reference[key]:
                where = f" at {other.get(key + '_path')}" if key in ("model", "data") else ""
                problems.append(f"rank {rank} ({other['host']}) has {key} {other[key]}{where}, rank 0 "
                                f"({reference['host']}) has {reference[key]}: {fix}")
    return problems


def check_same_inputs(world, model_path: str | Path, data_path: str | Path) -> None:
    """Refuse (ValueError, on every rank) when any host's kit, model or data differs from rank 0's."""
    if world.size == 1:
        return
    from .distributed import gather_strings

    prints = [json.loads(t) for t in gather_strings(world, json.dumps(fingerprint(model_path, data_path)))]
    problems = compare_fingerprints(prints)
    if problems:
        raise ValueError("refused before training: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    """`python -m mlx_lora.launch check CONFIG`: one rank of `doctor --hosts`; rank 0 prints the result."""
    from .config import load_config
    from .distributed import init
    from .models import resolve_source

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "check":
        print("usage: python -m mlx_lora.launch check CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(argv[1], argv[2:])
    world = init(cfg.distributed.backend, cfg.distributed.timeout_s)
    _, model_path = resolve_source(cfg.model)
    try:
        check_same_inputs(world, model_path, cfg.data.path)
    except ValueError as err:
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    if world.is_main:
        print(f"ring ok: {world.size} ranks joined ({cfg.distributed.backend}); same mlx-lora, mlx, model and data on every host")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
