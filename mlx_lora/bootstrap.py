"""Set-up for the shell scripts: find or create the project's Python environment.

Runs on the system Python with the standard library only (nothing else may be installed
yet). Prints the interpreter the scripts should use. It creates `.venv/` and installs the
package there when the current interpreter lacks the dependencies, and on Linux makes a fast
BLAS available when it can (apt as root), since MLX's bundled one is ~20x slower.

    python3 -m mlx_lora.bootstrap [--extras test,cuda,mkl]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
REQUIRED_MODULES = ("mlx", "mlx_lm", "yaml", "tqdm", "matplotlib", "safetensors", "gguf", "transformers")
EXTRA_MODULES = {"test": ("pytest", "hypothesis", "peft"), "cuda": ("torch", "peft", "bitsandbytes")}
TORCH_EXTRAS = {"test", "cuda"}  # extras that install torch (peft needs it)


def say(message: str) -> None:
    print(f"[setup] {message}", file=sys.stderr, flush=True)


def has_modules(python: str, modules) -> bool:
    code = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    return subprocess.run([python, "-c", code, *modules], capture_output=True).returncode == 0


def install_stamp(extras: list[str]) -> str:
    """What `.venv/.mlx-lora-installed` records: the pyproject.toml it was installed from (a digest)
    and the extras installed, e.g. "3f2a9c0d1e2b4a5c test". Extras accumulate: a venv set up for the
    tests serves train_by_mlx.sh too, without reinstalling back and forth."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return " ".join([digest, *sorted(set(extras))])


def installed_extras(stamp_file: Path) -> set[str] | None:
    """The extras recorded in the stamp file when it matches this pyproject.toml, else None."""
    try:
        digest, *extras = stamp_file.read_text().split()
    except (OSError, ValueError):
        return None
    return set(extras) if digest == install_stamp([]) else None


def ensure_environment(extras: list[str]) -> str:
    """The Python to use: the current one if it has everything, else `.venv` (created as needed)."""
    modules = list(REQUIRED_MODULES) + [m for e in extras for m in EXTRA_MODULES.get(e, ())]
    if os.environ.get("MLX_LORA_PYTHON"):
        return os.environ["MLX_LORA_PYTHON"]
    in_repo = importlib.util.find_spec("mlx_lora") and Path(importlib.util.find_spec("mlx_lora").origin).resolve().parent.parent == ROOT
    if sys.prefix != sys.base_prefix and in_repo and has_modules(sys.executable, modules):
        return sys.executable  # an activated environment that already has everything
    python = VENV / "bin" / "python"
    stamp_file = VENV / ".mlx-lora-installed"
    installed = installed_extras(stamp_file) if python.exists() else None
    if installed is not None and set(extras) <= installed:
        return str(python)
    extras = sorted(set(extras) | (installed or set()))  # keep what an earlier set-up installed
    target = "." + (f"[{','.join(extras)}]" if extras else "")
    uv = shutil.which("uv")
    if uv is None and not set(extras) & TORCH_EXTRAS:
        uv = venv_uv(python)
    say(f"installing mlx-lora{target[1:]} and its dependencies into {VENV} with {'uv' if uv else 'pip'} (first run only)")
    try:
        for command in install_commands(python, target, uv):
            subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    except subprocess.CalledProcessError:
        if uv is None or not python.exists():
            raise
        say("uv could not install them (a package index only pip is configured for?): trying pip")
        for command in install_commands(python, target, None):
            subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    stamp_file.write_text(install_stamp(extras) + "\n")
    return str(python)


def venv_uv(python: Path) -> str | None:
    """uv installed into a new `.venv` by pip (one ~20 MB wheel), or None where that fails.

    Measured on a fresh 2-core Linux machine: venv + `pip install uv` 8 s, then uv installed
    the package and its dependencies in 5 s with an empty uv cache, where pip took ~45 s with a
    warm pip cache. Not where pip is given another index (a mirror uv would not know), and not
    for the extras that pull torch: uv reads neither pip's configuration
    (find-links, mirrors, constraints) nor PyTorch's CPU index, and PyPI's default Linux torch
    is the multi-GB CUDA build.
    """
    if not python.exists():
        created = subprocess.run([sys.executable, "-m", "venv", str(VENV)], stdout=sys.stderr)
        if created.returncode != 0:
            return None
    if pip_index_configured(python):
        return None  # a mirror only pip knows about: uv would try PyPI and time out before pip takes over
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "uv"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uv = python.parent / "uv"
    return str(uv) if installed.returncode == 0 and uv.exists() else None


def pip_index_configured(python: Path) -> bool:
    """Whether pip is pointed at another package index than PyPI (PIP_INDEX_URL or pip.conf)."""
    if os.environ.get("PIP_INDEX_URL"):
        return True
    found = subprocess.run([str(python), "-m", "pip", "config", "get", "global.index-url"],
                           capture_output=True, text=True)
    return found.returncode == 0 and bool(found.stdout.strip())


def install_commands(python: Path, target: str, uv: str | None) -> list[list[str]]:
    """The commands that create `.venv` (if missing) and install `target` into it.

    uv, when on PATH, resolves and installs several times faster than pip (a fresh first run
    spends most of its set-up there); pip otherwise.
    """
    commands = []
    if uv:
        if not python.exists():
            commands.append([uv, "venv", "--quiet", "--python", sys.executable, str(VENV)])
        commands.append([uv, "pip", "install", "--quiet", "--python", str(python), "-e", target])
        return commands
    if not python.exists():
        commands.append([sys.executable, "-m", "venv", str(VENV)])
    commands.append([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    commands.append([str(python), "-m", "pip", "install", "--quiet", "-e", target])
    return commands


def ensure_fast_blas() -> None:
    """On Linux, install OpenBLAS with apt when running as root and none is present; else advise."""
    if not sys.platform.startswith("linux"):
        return
    sys.path.insert(0, str(ROOT))
    from mlx_lora.blas import INSTALL_HINT, find_fast_blas

    if find_fast_blas():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing OpenBLAS (libopenblas0-pthread) so MLX matmuls run ~20x faster")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "libopenblas0-pthread"],
                       stdout=subprocess.DEVNULL, stderr=sys.stderr, env=env)
    if not find_fast_blas():
        say(f"no fast BLAS found: training will be slow; {INSTALL_HINT}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", default="", help="comma-separated extras to install (test, cuda, mkl)")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    try:
        ensure_fast_blas()
        print(ensure_environment(extras))
    except subprocess.CalledProcessError as err:
        say(f"set-up failed: `{' '.join(map(str, err.cmd))}` exited with {err.returncode}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
