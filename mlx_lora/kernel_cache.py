"""A faster first run on the CPU: MLX's kernel compiler given a precompiled preamble header.

On the CPU, `mx.compile` fuses element-wise work into C++ kernels that MLX builds, the first time
each one runs, with `g++ -std=c++17 -O3 -Wall -fPIC -shared -I <mlx>/include K.cpp` and caches
as shared libraries under `<temp>/mlx/<version>/cpu/` (mlx/backend/cpu/compiled.cpp). Every
kernel source starts with `#include "mlx/backend/cpu/compiled_preamble.h"`, whose templates are
most of the build: ~0.9 s a kernel, of which ~0.15 s is the kernel itself (g++ 12, measured
here). The demo's training and evaluation build ~60 kernels, ~45 s of a first run.

GCC looks for `<header>.gch` in each directory it searches before the header itself, and a
quoted include searches the including file's own directory first (GCC manual, "Precompiled
Headers"): a precompiled header at `<cache>/mlx/backend/cpu/compiled_preamble.h.gch` is used
by every kernel MLX builds there, with the same machine code (checked by `objdump` when this
was written). It is built once per MLX version and temp folder (~2.5 s, in the background while
the model loads) with the flags MLX uses, written under another name and renamed, so a kernel
build never sees half a file. GCC ignores a precompiled header made by another compiler
version or with other flags and reads the header instead: slower, never wrong (the g++ that
built it is recorded beside it, and another one rebuilds it). Linux only
(MLX's CPU kernels elsewhere build with another compiler); nothing is done when MLX runs on a
GPU or g++ is missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"
# MLX's own kernel build flags (mlx/backend/cpu/compiled.cpp), less `-shared`; a precompiled
# header is only used by builds whose code-generation flags match the ones it was made with.
FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")
DISABLE_ENV = "MLX_LORA_NO_KERNEL_PCH"


def temp_root() -> Path:
    """The folder `std::filesystem::temp_directory_path()` gives MLX on POSIX (libstdc++: the
    first of TMPDIR, TMP, TEMP, TEMPDIR that is set, else /tmp)."""
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        value = os.environ.get(name)
        if value:
            return Path(value)
    return Path("/tmp")


def kernel_cache_dir(version: str | None = None) -> Path:
    """MLX's CPU kernel cache: `<temp>/mlx/<mlx version>/cpu`."""
    if version is None:
        import mlx.core as mx

        version = mx.__version__
    return temp_root() / "mlx" / version / "cpu"


def mlx_include_dir() -> Path:
    """The headers MLX passes to g++ (`-I`): the `include` folder of the installed mlx package."""
    import mlx.core as mx

    return Path(mx.__file__).resolve().parent / "include"


def preamble_pch_path(cache_dir: Path | None = None) -> Path:
    """Where the precompiled preamble goes so that kernel builds in `cache_dir` find it."""
    return (cache_dir or kernel_cache_dir()) / (PREAMBLE + ".gch")


def pch_command(include_dir: Path, out: Path) -> list[str]:
    """The g++ command that precompiles MLX's kernel preamble into `out`."""
    return ["g++", *FLAGS, "-I", str(include_dir), "-x", "c++-header", str(include_dir / PREAMBLE), "-o", str(out)]


class PreambleBuild:
    """A precompiled-header build running in the background (`start_preamble_pch`)."""

    def __init__(self, process: subprocess.Popen, target: Path):
        self.process, self.target, self.started = process, target, time.perf_counter()

    def finish(self, timeout: float | None = None) -> str:
        """Wait for the build (at most `timeout` seconds; the child renames the file into place
        itself) and say how it went in one line for the run log."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "kernel compiler: the precompiled header is still building (kernels built meanwhile read the header)"
        seconds = time.perf_counter() - self.started
        if self.process.returncode == 0 and self.target.exists():
            return f"kernel compiler: MLX's kernel preamble precompiled in {seconds:.1f} s ({self.target})"
        return f"kernel compiler: precompiling MLX's kernel preamble failed (g++ exit {self.process.returncode}); kernels build without it"


def start_preamble_pch(cache_dir: Path | None = None) -> PreambleBuild | None:
    """Start building the precompiled preamble for MLX's CPU kernels in the background, or return
    None when it is not needed (already built by this g++, not Linux, MLX on a GPU, no g++, or
    MLX_LORA_NO_KERNEL_PCH set). The child writes a temporary file and renames it into place
    itself, so the header is there for later runs whether or not the caller waits."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV) or shutil.which("g++") is None:
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu and cache_dir is None:
        return None
    target = preamble_pch_path(cache_dir)
    include = mlx_include_dir()
    stamp = target.with_name(target.name + ".compiler")  # which g++ built it: another one ignores it
    compiler = compiler_id()
    try:
        if not (include / PREAMBLE).exists() or (target.exists() and stamp.exists() and stamp.read_text() == compiler):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    command = pch_command(include, tmp)
    script = f"{shlex.join(command)} 2>/dev/null && mv -f {shlex.quote(str(tmp))} {shlex.quote(str(target))} || rm -f {shlex.quote(str(tmp))}"
    stamp_tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    try:
        process = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        stamp_tmp.write_text(compiler)
        os.replace(stamp_tmp, stamp)
    except OSError:
        return None
    return PreambleBuild(process, target)


def compiler_id(compiler: str = "g++") -> str:
    """The first line of `<compiler> --version` (g++ rejects a precompiled header another version made)."""
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = done.stdout.splitlines()
    return lines[0] if lines else ""
