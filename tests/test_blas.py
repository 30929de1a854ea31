"""Choosing the BLAS MLX runs on under Linux: the preload and OpenBLAS's kernel family."""

import pytest

from mlx_lora import blas

AVX512 = {"sse3", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw"}
AVX2 = {"sse3", "avx", "avx2", "fma"}


def test_cpu_flags_read_from_cpuinfo_text():
    text = "processor\t: 0\nmodel\t\t: 207\nflags\t\t: fpu sse3 avx2 fma avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert blas.cpu_flags(text) == {"fpu", "sse3", "avx2", "fma", "avx512f"}
    assert blas.cpu_flags("no flags here") == set()


@pytest.mark.parametrize("core, flags, expected", [
    ("Prescott", AVX512, "SKYLAKEX"),  # OpenBLAS 0.3.21 on an Emerald Rapids Xeon
    ("Prescott", AVX2, "HASWELL"),
    ("Sandybridge", AVX2, "HASWELL"),  # AVX only: still short of the CPU's AVX2
    ("Haswell", AVX512, "SKYLAKEX"),
    ("SkylakeX", AVX512, None),  # already the CPU's widest kernels
    ("Cooperlake", AVX512, None),
    ("Zen", AVX2, None),
    ("Prescott", {"sse3"}, None),  # an old CPU: its pick is right
    (None, AVX512, None),  # not OpenBLAS (MKL), or it could not be asked
])
def test_better_coretype_only_raises_a_pick_below_the_cpu(core, flags, expected):
    assert blas.better_coretype(core, flags) == expected


def test_blas_env_keeps_the_users_preload_and_coretype(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "HASWELL")
    monkeypatch.setattr(blas, "openblas_corename", lambda path: pytest.fail("asked although the user chose"))
    assert blas.blas_env("/lib/libopenblas.so.0") == {"LD_PRELOAD": "/lib/libopenblas.so.0:/opt/mine.so"}


def test_blas_env_sets_the_coretype_when_openblas_picks_slower_kernels(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas, "openblas_corename", lambda path: "Prescott")
    monkeypatch.setattr(blas, "cpu_flags", lambda: AVX512)
    assert blas.blas_env("/lib/libopenblas.so.0") == {"LD_PRELOAD": "/lib/libopenblas.so.0",
                                                      "OPENBLAS_CORETYPE": "SKYLAKEX"}


def test_openblas_corename_asks_the_real_library():
    path = next((p for p in blas.CANDIDATES if blas.os.path.exists(p)), None)
    if path is None:
        pytest.skip("no OpenBLAS on this machine")
    name = blas.openblas_corename(path)
    assert name and name.isprintable()
    assert blas.openblas_corename("/nonexistent/libopenblas.so.0") is None


@pytest.mark.parametrize("mkl, intel, iomp, gomp, openblas, expected", [
    ("/v/lib/libmkl_rt.so.3", True, "/v/lib/libiomp5.so", None, True, "/v/lib/libmkl_rt.so.3"),  # pip's mkl, Intel CPU
    ("/v/lib/libmkl_rt.so.3", True, None, "libgomp.so.1", True, "/v/lib/libmkl_rt.so.3"),  # its GNU layer
    ("/v/lib/libmkl_rt.so.3", False, "/v/lib/libiomp5.so", "libgomp.so.1", True, "/sys/libopenblas.so.0"),  # AMD
    ("/v/lib/libmkl_rt.so.3", True, None, None, True, "/sys/libopenblas.so.0"),  # MKL would run single-threaded
    ("/v/lib/libmkl_rt.so.3", False, None, None, False, "/v/lib/libmkl_rt.so.3"),  # nothing else: MKL beats the reference
    (None, True, None, "libgomp.so.1", True, "/sys/libopenblas.so.0"),
    (None, True, None, "libgomp.so.1", False, None),
])
def test_find_fast_blas_prefers_an_installed_mkl_on_intel(monkeypatch, mkl, intel, iomp, gomp, openblas, expected):
    monkeypatch.setattr(blas, "installed_mkl", lambda: mkl)
    monkeypatch.setattr(blas, "installed_intel_openmp", lambda: iomp)
    monkeypatch.setattr(blas, "intel_cpu", lambda: intel)
    monkeypatch.setattr(blas, "gnu_openmp", lambda: gomp)
    monkeypatch.setattr(blas, "CANDIDATES", ("/sys/libopenblas.so.0",))
    monkeypatch.setattr(blas.os.path, "exists", lambda path: openblas and path == "/sys/libopenblas.so.0")
    assert blas.find_fast_blas() == expected


def test_intel_cpu_read_from_cpuinfo_text():
    assert blas.intel_cpu("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert not blas.intel_cpu("processor\t: 0\nvendor_id\t: AuthenticAMD\n")


@pytest.mark.parametrize("iomp, gomp, user, expected", [
    (False, "libgomp.so.1", None, "GNU"), (False, None, None, "SEQUENTIAL"),
    (True, "libgomp.so.1", None, None),  # pip's mkl brings intel-openmp: MKL's own default layer loads
    (False, "libgomp.so.1", "INTEL", None)])  # the user's choice is kept
def test_blas_env_gives_mkl_a_threading_layer_that_loads(monkeypatch, iomp, gomp, user, expected):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(blas, "gnu_openmp", lambda: gomp)
    monkeypatch.setattr(blas, "installed_intel_openmp", lambda: "/v/lib/libiomp5.so" if iomp else None)
    monkeypatch.setattr(blas, "openblas_corename", lambda path: None)
    if user:
        monkeypatch.setenv("MKL_THREADING_LAYER", user)
    else:
        monkeypatch.delenv("MKL_THREADING_LAYER", raising=False)
    env = blas.blas_env("/v/lib/libmkl_rt.so.3")
    assert env["LD_PRELOAD"] == "/v/lib/libmkl_rt.so.3"
    assert env.get("MKL_THREADING_LAYER") == expected


def test_an_installed_mkl_multiplies_under_the_env_we_give_it():
    import os
    import subprocess
    import sys

    path = blas.installed_mkl()
    if path is None:
        pytest.skip("no pip-installed MKL in this environment")
    code = ("import mlx.core as mx; a = mx.random.normal((300, 200)); b = mx.random.normal((200, 100)); "
            "import numpy as np; print(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max())")
    env = {**{k: v for k, v in os.environ.items() if k != "MKL_THREADING_LAYER"}, **blas.blas_env(path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 1e-3
