"""A decode step's products on the CPU with our own kernel (`panel_matmul.cpp`), built at run time.

Why: a serving step multiplies a few rows (one per running sequence) by every weight. At 8 rows
the BLAS libraries run far below what reading the weights once costs: on the fused demo model
(SmolLM2-135M float32, a 2-core Xeon, MKL 2 threads, in one process) all of a step's products took
82 ms for 8 rows against 45 ms for one, in the faster of their two orientations (`cpu_decode.py`).
MKL's skinny path re-reads or re-packs the weights; its time grows with the rows although the
weights read do not. The kernel stores each weight as panels of 32 output features (a copy made
at start-up: `pack`), streams every panel once with a software prefetch, and keeps 32 outputs of
up to 8 rows in vector registers, so 8 rows cost about what one does: 45.7 ms for all of a step's
products at 8 rows (41.0 at one), same run. Every row's sums run in the same order whatever the
batch, so a row's products give the same floats alone or in a batch (MKL's differ by ~1e-6).
With adapters, `lora_panel_matmul` adds each row's own adapter term in the same call.

How: MLX runs a custom operation as a C++ `Primitive` (MLX's "Custom Extensions" guide); its
Python binding must be built against the installed MLX's headers and library and with the
nanobind ABI MLX was built with, so it is compiled here, once per (kernel source, MLX, nanobind,
Python, g++, CPU flags), with `-O3 -march=native` (~12 s on this 2-core machine: nanobind's own
sources are most of it), checked against `x @ W.T` in a child process, and cached under
`~/.cache/mlx-lora/kernels/` with its sha256 (a damaged file, which can crash the loader, is
rebuilt). A failed build is recorded there too (with its reason), so it is not retried on every
start, unless the compiler was killed or timed out. Anything missing (not Linux or macOS, no g++, no nanobind, an ABI
mismatch, a wrong answer) leaves the BLAS products in place, with a one-line reason.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

import mlx.core as mx

from ..kernel_cache import compiler_id

PANEL = 32  # output features per panel; panel_matmul.cpp's PANEL
SOURCE = Path(__file__).with_name("panel_matmul.cpp")
MODULE = "_panel_matmul"
DISABLE_ENV = "MLX_LORA_NO_PANEL_KERNEL"
CACHE_ENV = "MLX_LORA_KERNEL_DIR"
FLAGS = ("-std=c++20", "-O3", "-march=native", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_DOMAIN=mlx")
BUILD_TIMEOUT = 600  # seconds for one compiler run
CHECK_TOLERANCE = 1e-4  # max |kernel - x @ W.T| relative to max |x @ W.T| in the self-check


@dataclass
class KernelBuild:
    """What `load` found: the module (None when it cannot be used) and one line for the log."""

    module: Optional[ModuleType]
    note: str
    seconds: float = 0.0  # spent building and checking in this process (0 when cached)


def cache_root() -> Path:
    """`$MLX_LORA_KERNEL_DIR`, else `$XDG_CACHE_HOME/mlx-lora/kernels` (default ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-lora" / "kernels"


def _nanobind() -> Optional[ModuleType]:
    try:
        import nanobind
    except ImportError:
        return None
    return nanobind


def _abi_version(text: str) -> Optional[str]:
    match = re.search(r"nanobind_\w*?_v(\d+)", text)
    return match.group(1) if match else None


def _mlx_nanobind_abi() -> Optional[str]:
    """The nanobind internals version the installed MLX's Python module was built with (its ABI tag)."""
    core = Path(mx.__file__)
    try:
        data = core.read_bytes()
    except OSError:
        return None
    match = re.search(rb"nanobind_[a-z0-9_]*?_v(\d+)", data)
    return match.group(1).decode() if match else None


def _installed_nanobind_abi(nanobind: ModuleType) -> Optional[str]:
    header = Path(nanobind.source_dir()) / "nb_internals.h"
    try:
        match = re.search(r"define NB_INTERNALS_VERSION (\d+)", header.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _compiler() -> Optional[str]:
    compiler = os.environ.get("CXX") or "g++"
    return compiler if shutil.which(compiler) else None


def _cpu_flags() -> str:
    """The CPU's feature flags (`-march=native` code may not run on another CPU sharing the cache)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _mlx_dir() -> Path:
    return Path(mx.__file__).resolve().parent


def build_key(compiler: str, nanobind: ModuleType) -> str:
    """A digest of everything the built module depends on."""
    parts = [SOURCE.read_text(), mx.__version__, str(_mlx_dir()), nanobind.__version__, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
             str(shutil.which(compiler)), compiler_id(compiler), " ".join(FLAGS), _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _commands(compiler: str, nanobind: ModuleType, work: Path, target: Path) -> list[list[str]]:
    """Two compiles (ours and nanobind's combined sources, run side by side) and the link."""
    mlx_dir = _mlx_dir()
    includes = ["-I", nanobind.include_dir(), "-I", str(Path(nanobind.source_dir()).parent / "ext" / "robin_map" / "include"),
                "-I", sysconfig.get_paths()["include"], "-I", str(mlx_dir / "include")]
    ours, theirs = work / "panel_matmul.o", work / "nanobind.o"
    link = [compiler, "-shared", str(ours), str(theirs), "-o", str(target), "-L", str(mlx_dir / "lib"), "-lmlx",
            f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    return [[compiler, *FLAGS, *includes, "-c", str(SOURCE), "-o", str(ours)],
            [compiler, *FLAGS, *includes, "-c", str(Path(nanobind.source_dir()) / "nb_combined.cpp"), "-o", str(theirs)],
            link]


CHECK_SCRIPT = """
import importlib.util, sys
import mlx.core as mx
spec = importlib.util.spec_from_file_location("{name}", sys.argv[1])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
sys.path.insert(0, sys.argv[2])
from mlx_lora.serve.panel_kernel import self_check
problem = self_check(module)
print(problem or "ok")
"""


def self_check(module: ModuleType) -> Optional[str]:
    """None when the module's products equal `x @ W.T` (float32, `CHECK_TOLERANCE`) for several
    shapes and row counts, alone and in a batch; else what differed."""
    for out, inner in ((100, 64), (192, 576), (1536, 576)):
        weight = mx.random.normal((out, inner), key=mx.random.key(out))
        panels = pack(weight)
        x = mx.random.normal((13, inner), key=mx.random.key(inner))
        for rows in (1, 3, 8, 13):
            want = x[:rows] @ weight.T
            got = module.panel_matmul(x[:rows], panels, out)
            scale = mx.abs(want).max().item()
            error = mx.abs(got - want).max().item()
            if got.shape != want.shape or not error <= CHECK_TOLERANCE * scale:
                return f"{out}x{inner}, {rows} rows: max error {error:.3g} against x @ W.T (scale {scale:.3g})"
        alone = mx.concatenate([module.panel_matmul(x[i:i + 1], panels, out) for i in range(8)])
        if not mx.array_equal(alone, module.panel_matmul(x[:8], panels, out)).item():
            return f"{out}x{inner}: a row's product differs alone and in a batch"
        a = mx.random.normal((3, inner, 8), key=mx.random.key(1)) * 0.1
        b = mx.random.normal((3, 8, out), key=mx.random.key(2)) * 0.1
        scales, slots = mx.array([0.0, 2.0, 0.5]), mx.array([1, 0, 2, 2, 1, 0, 1, 2], dtype=mx.uint32)
        want = x[:8] @ weight.T + scales[slots][:, None] * mx.einsum("ri,rik,rko->ro", x[:8], a[slots], b[slots])
        got = module.lora_panel_matmul(x[:8], panels, out, a, pack_lora_b(b), scales, slots)
        error = mx.abs(got - want).max().item()
        if not error <= CHECK_TOLERANCE * mx.abs(want).max().item():
            return f"{out}x{inner}, adapters: max error {error:.3g} against x @ W.T + s x A B"
    return None


def _build(compiler: str, nanobind: ModuleType, folder: Path, target: Path) -> tuple[Optional[str], float, bool]:
    """Compile, link and check into `target` (renamed into place when it passes, its digest beside
    it); (problem or None, seconds, whether the problem would recur: a compiler error or a failed
    check does, a compiler killed by a signal, a timeout or a file error may not)."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / f".build-{os.getpid()}"
    work.mkdir(exist_ok=True)
    staged = work / target.name
    try:
        *compiles, link = _commands(compiler, nanobind, work, staged)
        running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in compiles]
        for command, process in zip(compiles, running):
            output, _ = process.communicate(timeout=BUILD_TIMEOUT)
            if process.returncode != 0:
                first = next((line for line in output.splitlines() if "error" in line), output.strip()[-300:])
                killed = process.returncode < 0 or "Killed signal" in output
                return (f"{Path(command[-3]).name} did not compile ({compiler} exit {process.returncode}): {first.strip()}",
                        time.perf_counter() - start, not killed)
        done = subprocess.run(link, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        if done.returncode != 0:
            return (f"linking failed ({compiler} exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}",
                    time.perf_counter() - start, done.returncode > 0)
        check = subprocess.run([sys.executable, "-c", CHECK_SCRIPT.format(name=MODULE), str(staged), str(Path(__file__).resolve().parents[2])],
                               capture_output=True, text=True, timeout=BUILD_TIMEOUT, env={**os.environ, "PYTHONPATH": ""})
        verdict = check.stdout.strip().splitlines()[-1] if check.stdout.strip() else ""
        if check.returncode != 0 or verdict != "ok":
            reason = verdict or (check.stderr.strip().splitlines() or ["no output"])[-1]
            return f"the built kernel failed its check (exit {check.returncode}): {reason}", time.perf_counter() - start, True
        stamp = target.with_name(target.name + ".sha256")
        staged_stamp = work / stamp.name
        staged_stamp.write_text(_digest(staged) + "\n")
        os.replace(staged, target)
        os.replace(staged_stamp, stamp)
        return None, time.perf_counter() - start, True
    except subprocess.TimeoutExpired:
        return f"building took over {BUILD_TIMEOUT} s", time.perf_counter() - start, False
    except OSError as error:
        return f"building failed: {error}", time.perf_counter() - start, False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import(path: Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_loaded: Optional[KernelBuild] = None


def load() -> KernelBuild:
    """The kernel module, built (once per cache key) or read from the cache; once per process.
    Never raises: a module of None comes with the reason."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether `target` is the file its build wrote (its digest, recorded beside it, matches): a
    damaged shared library can crash `dlopen` itself (a truncated one raised SIGBUS here)."""
    stamp = target.with_name(target.name + ".sha256")
    try:
        return target.exists() and stamp.read_text().strip() == _digest(target)
    except OSError:
        return False


def _clear_stale_builds(folder: Path) -> None:
    """Remove `.build-<pid>` folders of processes that are gone (a build killed by a signal)."""
    for stale in folder.glob(".build-*"):
        try:
            os.kill(int(stale.name.split("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _load() -> KernelBuild:
    if os.environ.get(DISABLE_ENV):
        return KernelBuild(None, f"panel kernel: off ({DISABLE_ENV} is set)")
    if sys.platform not in ("linux", "darwin"):
        return KernelBuild(None, f"panel kernel: not built on {sys.platform}")
    nanobind = _nanobind()
    if nanobind is None:
        return KernelBuild(None, "panel kernel: not built: nanobind is not installed (pip install nanobind)")
    ours, mlx_abi = _installed_nanobind_abi(nanobind), _mlx_nanobind_abi()
    if ours is None or mlx_abi is None or ours != mlx_abi:
        return KernelBuild(None, f"panel kernel: not built: MLX {mx.__version__} uses nanobind ABI v{mlx_abi}, the installed "
                                 f"nanobind {nanobind.__version__} v{ours} (install the nanobind release with MLX's ABI)")
    compiler = _compiler()
    if compiler is None:
        if os.environ.get("CXX"):
            return KernelBuild(None, f"panel kernel: not built: $CXX ({os.environ['CXX']!r}) is not a program on PATH "
                                     "(set CXX to a compiler's path, or unset it to use g++)")
        return KernelBuild(None, "panel kernel: not built: no C++ compiler (install g++, or set $CXX)")
    folder = cache_root() / build_key(compiler, nanobind)
    target = folder / (MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    failed = folder / "failed.txt"
    seconds, how = 0.0, "cached"
    if not _intact(target):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / "build.lock", "w")
        except OSError as error:
            return KernelBuild(None, f"panel kernel: not built: cannot write its cache folder {folder}: {error}")
        with lock:
            import fcntl

            waited = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: the others wait for it, then load it
            waited = time.perf_counter() - waited
            if _intact(target):
                how = f"built by another process (waited {waited:.1f} s)" if waited > 1 else how
            else:
                if failed.exists():
                    return KernelBuild(None, f"panel kernel: not used: an earlier build failed: {failed.read_text().strip()} "
                                             f"(delete {failed} to try again)")
                _clear_stale_builds(folder)
                damaged = target.exists()
                problem, seconds, lasting = _build(compiler, nanobind, folder, target)
                if problem is not None:
                    if lasting:  # the same build would fail again; one that was killed or timed out may not
                        try:
                            failed.write_text(problem + "\n")
                        except OSError:
                            pass
                    return KernelBuild(None, f"panel kernel: not used: {problem}", seconds)
                how = f"{'damaged cached file rebuilt' if damaged else 'built'} and checked in {seconds:.1f} s"
    try:
        module = _import(target)
    except Exception as error:  # noqa: BLE001 - a module that does not load leaves the BLAS products
        return KernelBuild(None, f"panel kernel: not used: {target} did not load ({error}); delete it to rebuild", seconds)
    return KernelBuild(module, f"panel kernel: {how} ({target}), {module.threads()} threads", seconds)


def pack(weight: mx.array) -> mx.array:
    """weight (out, in) float32 -> panels (ceil(out / PANEL), in, PANEL): panels[p, i, j] =
    weight[p * PANEL + j, i], zero past `out` (a new contiguous array)."""
    out, inner = weight.shape
    count = -(-out // PANEL)
    if count * PANEL != out:
        weight = mx.pad(weight, [(0, count * PANEL - out), (0, 0)])
    return mx.contiguous(weight.reshape(count, PANEL, inner).swapaxes(1, 2))


def pack_lora_b(b_stack: mx.array) -> mx.array:
    """Adapters' B matrices (slots, rank, out) float32 -> (slots, ceil(out / PANEL), rank, PANEL), the
    layout `lora_panel_matmul` adds each row's z @ B from, panel by panel (zero past `out`)."""
    slots, rank, out = b_stack.shape
    count = -(-out // PANEL)
    if count * PANEL != out:
        b_stack = mx.pad(b_stack, [(0, 0), (0, 0), (0, count * PANEL - out)])
    return mx.contiguous(b_stack.reshape(slots, rank, count, PANEL).transpose(0, 2, 1, 3))
