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
    path = blas.find_fast_blas()
    if path is None or "openblas" not in path:
        pytest.skip("no OpenBLAS on this machine")
    name = blas.openblas_corename(path)
    assert name and name.isprintable()
    assert blas.openblas_corename("/nonexistent/libopenblas.so.0") is None
