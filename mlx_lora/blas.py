"""Finding a fast BLAS for MLX on Linux, and checking which one is in use.

MLX's Linux wheel links a slow reference BLAS (~5 GFLOP/s float32 matmul measured here);
preloading OpenBLAS lifts it to ~190 and MKL to ~85. A preload must be in place before the
process starts, so the CLI re-executes itself once with LD_PRELOAD set (see `cli.main`).
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

DISABLE_ENV = "MLX_LORA_NO_BLAS_PRELOAD"
MARK_ENV = "MLX_LORA_BLAS"

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblaso.so.0",
)

INSTALL_HINT = ("install a fast BLAS for ~20x faster training: `sudo apt-get install libopenblas0-pthread` "
                "(Debian/Ubuntu), `sudo dnf install openblas` (Fedora), or `pip install mkl`")


def find_fast_blas() -> str | None:
    """Path of an OpenBLAS (preferred) or MKL shared library, or None."""
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in (f"{sys.prefix}/lib/libmkl_rt.so*",):
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    return None


def preload_command_env() -> dict | None:
    """The environment to re-exec with so MLX uses a fast BLAS, or None when not needed/possible."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV) or os.environ.get(MARK_ENV):
        return None
    path = find_fast_blas()
    if path is None:
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if path in preload.split(":"):
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (path, preload) if p)
    env[MARK_ENV] = path
    return env


def loaded_blas_libraries() -> list[str]:
    """BLAS-like shared libraries mapped into this process (Linux), by reading /proc/self/maps."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    names = set()
    for line in maps.read_text().splitlines():
        path = line.split()[-1] if line.split() else ""
        base = os.path.basename(path)
        if any(key in base for key in ("blas", "mkl", "lapack", "accelerate")):
            names.add(path)
    return sorted(names)


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul speed of MLX on the default device."""
    import time

    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * size**3 / seconds / 1e9
