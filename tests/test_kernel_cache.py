"""MLX's CPU kernel builds find the precompiled preamble (`mlx_lora/kernel_cache.py`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_lora import kernel_cache

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                                reason="MLX builds its CPU kernels with g++ on Linux")

# A compiled element-wise function MLX turns into a C++ kernel on the CPU; the shape is unusual so
# no other test's kernel matches it (kernels are cached by graph, not by test).
KERNEL = textwrap.dedent("""
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    f = mx.compile(lambda x, y: mx.maximum(x * 3.0 + y, -1.5) / (y * y + 2.0))
    x, y = mx.arange(37, dtype=mx.float32) - 9.0, mx.linspace(-2.0, 2.0, 37)
    out = f(x, y)
    ref = mx.maximum(x * 3.0 + y, -1.5) / (y * y + 2.0)
    assert mx.allclose(out, ref).item(), (out, ref)
    print("ok")
""")


def run_kernel(tmp: Path, log: Path) -> None:
    """Run KERNEL in a child whose temp folder is `tmp`, with a g++ that logs what it includes (-H)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@" -H 2>>"{log}"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp / "t"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    (tmp / "t").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", KERNEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_kernel_builds_use_the_precompiled_preamble(tmp_path, monkeypatch):
    import mlx.core as mx

    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    cache = kernel_cache.kernel_cache_dir()
    assert cache == tmp_path / "t" / "mlx" / mx.__version__ / "cpu"
    build = kernel_cache.start_preamble_pch(cache)
    assert build is not None
    message = build.finish(timeout=120)
    assert "precompiled in" in message, message
    pch = kernel_cache.preamble_pch_path(cache)
    assert pch.exists() and pch.stat().st_size > 1_000_000
    assert not list(pch.parent.glob("*.tmp")), "the temporary file was renamed, not left behind"
    assert kernel_cache.start_preamble_pch(cache) is None, "built once per cache"

    log = tmp_path / "gxx.log"
    run_kernel(tmp_path, log)
    assert list(cache.glob("*.so")), "MLX built its kernel in the folder kernel_cache_dir() names"
    included = log.read_text()
    assert f"! {pch}" in included, included[:2000]  # `-H` marks a precompiled header used with "!"


def test_without_the_precompiled_preamble_kernels_read_the_header(tmp_path):
    log = tmp_path / "gxx.log"
    run_kernel(tmp_path, log)
    included = log.read_text()
    assert "compiled_preamble.h" in included and ".gch" not in included, included[:2000]


def test_nothing_to_do_when_disabled_or_built_by_this_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_cache.DISABLE_ENV, "1")
    assert kernel_cache.start_preamble_pch(tmp_path) is None
    monkeypatch.delenv(kernel_cache.DISABLE_ENV)
    pch = kernel_cache.preamble_pch_path(tmp_path)
    pch.parent.mkdir(parents=True)
    pch.write_bytes(b"x")
    stamp = pch.with_name(pch.name + ".compiler")
    stamp.write_text(kernel_cache.compiler_id())
    assert kernel_cache.start_preamble_pch(tmp_path) is None
    stamp.write_text("g++ (Debian 11.2.0-1) 11.2.0")  # built by an older g++: rebuilt
    build = kernel_cache.start_preamble_pch(tmp_path)
    assert build is not None and "precompiled in" in build.finish(timeout=120)
    assert pch.stat().st_size > 1_000_000 and stamp.read_text() == kernel_cache.compiler_id()


def test_temp_root_follows_libstdcxx_order(monkeypatch):
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        monkeypatch.delenv(name, raising=False)
    assert kernel_cache.temp_root() == Path("/tmp")
    monkeypatch.setenv("TEMP", "/b")
    monkeypatch.setenv("TMP", "/a")
    assert kernel_cache.temp_root() == Path("/a")
    monkeypatch.setenv("TMPDIR", "/c")
    assert kernel_cache.temp_root() == Path("/c")


def test_doctor_reports_the_kernel_cache(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def doctor() -> str:
        done = subprocess.run([sys.executable, "-m", "mlx_lora", "doctor"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.splitlines() if line.startswith("kernels"))

    assert "precompiled preamble not built yet" in doctor()
    import mlx.core as mx

    build = kernel_cache.start_preamble_pch(tmp_path / "mlx" / mx.__version__ / "cpu")
    assert "precompiled in" in build.finish(timeout=120)
    assert "precompiled preamble present" in doctor()
