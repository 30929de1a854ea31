"""Finding a fast BLAS for MLX on Linux, and checking which one is in use.

MLX's Linux wheel links a slow reference BLAS (~5 GFLOP/s float32 matmul measured here);
preloading OpenBLAS lifts it to ~190-290, as does MKL on its GNU threading layer (single-threaded
on its sequential one, ~half that). A preload must be in place before the
process starts, so the CLI re-executes itself once with LD_PRELOAD set (see `cli.main`).

An OpenBLAS older than the CPU does not recognise it and falls back to its SSE3 "Prescott"
kernels: Debian 12's 0.3.21 on an Emerald Rapids Xeon (family 6, model 207) multiplied at 50
GFLOP/s where its own SkylakeX kernels give 230-300 (measured on the same machine, same run).
When the library's pick lacks the AVX2 / AVX-512 the CPU has, the preload also sets
`OPENBLAS_CORETYPE` (OpenBLAS's documented override for DYNAMIC_ARCH builds) to the newest
kernels the CPU runs; a user's own `OPENBLAS_CORETYPE` is kept.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import subprocess
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


def installed_mkl() -> str | None:
    """Path of the MKL that `pip install mkl` put into this environment (libmkl_rt), or None."""
    found = sorted(glob.glob(f"{sys.prefix}/lib/libmkl_rt.so*"))
    return found[-1] if found else None


def installed_intel_openmp() -> str | None:
    """Intel's OpenMP runtime (libiomp5) in this environment, which `pip install mkl` brings and
    MKL's default threading layer needs."""
    found = sorted(glob.glob(f"{sys.prefix}/lib/libiomp5.so*"))
    return found[-1] if found else None


def gnu_openmp() -> str | None:
    """The system's GNU OpenMP runtime (libgomp), which MKL's GNU threading layer runs on."""
    return ctypes.util.find_library("gomp")


def intel_cpu(cpuinfo: str | None = None) -> bool:
    """Whether the first CPU in /proc/cpuinfo is an Intel one (vendor_id GenuineIntel)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in cpuinfo.splitlines())


def find_fast_blas() -> str | None:
    """Path of the BLAS to preload, or None.

    An MKL installed in this environment (`pip install mkl`) comes first on Intel CPUs when it
    can run threaded (Intel's OpenMP runtime, or libgomp for its GNU layer): the same training
    step as OpenBLAS, and one serving client ~1.6x faster (OpenBLAS 0.3.21's sgemm packs the
    whole weight even for one row; README, "Fuse, serve and test"). Otherwise the system's
    OpenBLAS, then an MKL anyway (its speed on other CPUs was not measured here).
    """
    mkl = installed_mkl()
    if mkl and intel_cpu() and (installed_intel_openmp() or gnu_openmp()):
        return mkl
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    return mkl


CORETYPE_ENV = "OPENBLAS_CORETYPE"
MKL_THREADING_ENV = "MKL_THREADING_LAYER"
# OpenBLAS x86 cores (its `openblas_get_corename()` names, lower case) whose kernels use AVX2 / AVX-512.
AVX2_CORES = frozenset({"haswell", "zen", "excavator", "skylakex", "cooperlake", "sapphirerapids"})
AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The x86 feature flags of the first CPU in /proc/cpuinfo (empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def openblas_corename(path: str) -> str | None:
    """The kernel family the OpenBLAS at `path` picks on this CPU (e.g. "Haswell"), or None when
    `path` is not OpenBLAS or cannot be loaded. Asked in a child process: loading a BLAS here
    would start its threads in the caller."""
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
            "f.restype = ctypes.c_char_p; print(f().decode())")
    env = {k: v for k, v in os.environ.items() if k not in (CORETYPE_ENV, "LD_PRELOAD")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    try:
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def better_coretype(corename: str | None, flags: set[str]) -> str | None:
    """The `OPENBLAS_CORETYPE` to force when OpenBLAS picked `corename` on a CPU with `flags`, or
    None when its pick already uses the CPU's widest vector kernels (or it is not OpenBLAS)."""
    if not corename:
        return None
    core = corename.lower()
    if "avx512f" in flags and "avx512vl" in flags and core not in AVX512_CORES:
        return "SKYLAKEX"
    if "avx2" in flags and "fma" in flags and core not in AVX2_CORES:
        return "HASWELL"
    return None


def blas_env(path: str) -> dict[str, str]:
    """The variables that make MLX use the BLAS at `path` at its best: LD_PRELOAD (prepended to
    the caller's), `OPENBLAS_CORETYPE` when OpenBLAS would otherwise pick slower kernels, and for
    MKL a threading layer that loads: GNU (libgomp), else SEQUENTIAL, unless Intel's OpenMP
    runtime is installed or the user set `MKL_THREADING_LAYER`."""
    preload = os.environ.get("LD_PRELOAD", "")
    env = {"LD_PRELOAD": ":".join([path] + [p for p in preload.split(":") if p and p != path])}
    if "libmkl_rt" in os.path.basename(path) and MKL_THREADING_ENV not in os.environ and not installed_intel_openmp():
        # MKL's default (Intel) layer needs Intel's OpenMP runtime, which pip's mkl does not bring:
        # without it MLX's first product fails with "undefined symbol: omp_get_num_procs" (measured)
        env[MKL_THREADING_ENV] = "GNU" if gnu_openmp() else "SEQUENTIAL"
    if CORETYPE_ENV not in os.environ and sys.platform.startswith("linux"):
        coretype = better_coretype(openblas_corename(path), cpu_flags())
        if coretype:
            env[CORETYPE_ENV] = coretype
    return env


def preload_command_env() -> dict | None:
    """The environment to re-exec with so MLX uses a fast BLAS, or None when not needed/possible."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV) or os.environ.get(MARK_ENV):
        return None
    path = find_fast_blas()
    if path is None:
        return None
    if path in os.environ.get("LD_PRELOAD", "").split(":"):
        return None
    return {**os.environ, **blas_env(path), MARK_ENV: path}


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
