"""The CPU decode kernel (`serve/panel_kernel.py`, `serve/panel_matmul.cpp`): its products against a
float64 reference, a row's floats alone and in a batch, the panel layout, the all-or-nothing choice,
and every way it can be unavailable (each leaves the BLAS products and says why in one line)."""

from __future__ import annotations

import shutil
import sys

import pytest


def _kernel():
    """The built module. On Linux with g++ and nanobind (CI) it must build; elsewhere the test skips."""
    from mlx_lora.serve import panel_kernel

    build = panel_kernel.load()
    if build.module is None:
        try:
            import nanobind  # noqa: F401
            have_nanobind = True
        except ImportError:
            have_nanobind = False
        if sys.platform.startswith("linux") and shutil.which("g++") and have_nanobind:
            pytest.fail(build.note)
        pytest.skip(build.note)
    return build.module


@pytest.mark.parametrize("out,inner", [(100, 64), (192, 576), (1000, 96), (33, 7)])
def test_products_match_a_float64_reference(out, inner):
    import mlx.core as mx
    import numpy as np

    from mlx_lora.serve.panel_kernel import pack

    kernel = _kernel()
    weight = mx.random.normal((out, inner), key=mx.random.key(out))
    panels = pack(weight)
    x = mx.random.normal((13, inner), key=mx.random.key(inner))
    w64, x64 = np.array(weight, dtype=np.float64), np.array(x, dtype=np.float64)
    for rows in (1, 2, 5, 8, 9, 13):  # one tile, a partial tile, several tiles
        got = np.array(kernel.panel_matmul(x[:rows], panels, out))
        want = x64[:rows] @ w64.T
        assert got.shape == (rows, out) and got.dtype == np.float32
        # float32 sums of `inner` products: error ~ sqrt(inner) ulps of the terms (measured ~1e-6 relative)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() * np.sqrt(inner))
    strided = mx.random.normal((inner, 4), key=mx.random.key(1)).T  # (4, inner), column-major
    np.testing.assert_allclose(np.array(kernel.panel_matmul(strided, panels, out)),
                               np.array(strided, dtype=np.float64) @ w64.T, rtol=0, atol=1e-4 * np.sqrt(inner))


def test_a_row_gets_the_same_floats_alone_and_in_a_batch():
    import mlx.core as mx

    from mlx_lora.serve.panel_kernel import pack

    kernel = _kernel()
    weight = mx.random.normal((1536, 576), key=mx.random.key(0))
    panels = pack(weight)
    x = mx.random.normal((8, 576), key=mx.random.key(1))
    batch = kernel.panel_matmul(x, panels, 1536)
    for i in range(8):
        assert mx.array_equal(kernel.panel_matmul(x[i:i + 1], panels, 1536), batch[i:i + 1]).item()
        assert mx.array_equal(kernel.panel_matmul(x[:i + 1], panels, 1536), batch[:i + 1]).item()


@pytest.mark.parametrize("rank", [8, 16, 5])
def test_each_rows_adapter_term_matches_a_float64_reference(rank):
    """y[r] = x[r] @ W.T + scale[s] * x[r] @ A[s] @ B[s], s = slots[r]; slot 0 and a slot past the
    stack add nothing; a row's floats are the same alone and in a batch."""
    import mlx.core as mx
    import numpy as np

    from mlx_lora.serve.panel_kernel import pack, pack_lora_b

    kernel = _kernel()
    rng = np.random.default_rng(rank)
    out, inner, slots_n = 100, 48, 4
    weight = rng.normal(size=(out, inner))
    a = rng.normal(size=(slots_n, inner, rank))
    b = rng.normal(size=(slots_n, rank, out))
    a[0], b[0] = 0, 0  # slot 0: the bare base, as the adapter bank stacks it
    scales = np.array([0.0, 2.0, 0.5, 1.0])
    panels = pack(mx.array(weight, dtype=mx.float32))
    args = [mx.array(a, dtype=mx.float32), pack_lora_b(mx.array(b, dtype=mx.float32)), mx.array(scales, dtype=mx.float32)]
    slots = [1, 0, 2, 3, 7, 1, 2, 3, 3, 0]  # 7: a slot this layer has no adapter for
    x = rng.normal(size=(len(slots), inner))
    got = np.array(kernel.lora_panel_matmul(mx.array(x, dtype=mx.float32), panels, out, *args, mx.array(slots, dtype=mx.uint32)))
    for row, slot in enumerate(slots):
        want = x[row] @ weight.T
        if 0 < slot < slots_n:
            want = want + scales[slot] * (x[row] @ a[slot] @ b[slot])
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=f"row {row} slot {slot}")
    for row in range(len(slots)):
        alone = kernel.lora_panel_matmul(mx.array(x[row:row + 1], dtype=mx.float32), panels, out, *args,
                                         mx.array(slots[row:row + 1], dtype=mx.uint32))
        assert np.array_equal(np.array(alone)[0], got[row])
    with pytest.raises(ValueError, match="slots uint32"):
        kernel.lora_panel_matmul(mx.array(x, dtype=mx.float32), panels, out, *args, mx.array(slots, dtype=mx.int32))


def test_bad_arguments_are_refused():
    import mlx.core as mx

    from mlx_lora.serve.panel_kernel import pack

    kernel = _kernel()
    panels = pack(mx.ones((40, 16)))
    with pytest.raises(ValueError, match="x must be"):
        kernel.panel_matmul(mx.ones((2, 15)), panels, 40)
    with pytest.raises(ValueError, match="float32 only"):
        kernel.panel_matmul(mx.ones((2, 16), dtype=mx.float16), panels, 40)
    with pytest.raises(ValueError, match="out does not match"):
        kernel.panel_matmul(mx.ones((2, 16)), panels, 70)


def test_pack_layout():
    import mlx.core as mx
    import numpy as np

    from mlx_lora.serve.panel_kernel import PANEL, pack

    weight = mx.arange(70 * 5, dtype=mx.float32).reshape(70, 5)
    panels = np.array(pack(weight))
    assert panels.shape == (3, 5, PANEL)
    w = np.array(weight)
    for p in range(3):
        for j in range(PANEL):
            column = panels[p, :, j]
            o = p * PANEL + j
            np.testing.assert_array_equal(column, w[o] if o < 70 else np.zeros(5))


def _plan_with(panel_ms: float, plain_ms: float, transposed_ms: float):
    from mlx_lora.serve.cpu_decode import ProductPlan, _panel_wins

    shapes = [(64, 32), (32, 64)]
    plan = ProductPlan(max_rows=8, measured={s: {1: "plain", 8: "transposed"} for s in shapes})
    for s in shapes:
        for rows in (1, 8):
            plan.timings[(s, rows)] = {"plain": plain_ms, "transposed": transposed_ms, "panel": panel_ms}
    return plan, _panel_wins(plan, {s: [] for s in shapes})


def test_the_kernel_takes_every_product_or_none():
    """Summed over a step's shapes at the most rows, against the BLAS's faster orientation."""
    assert _plan_with(panel_ms=5.0, plain_ms=10.0, transposed_ms=8.0)[1]
    assert not _plan_with(panel_ms=7.9, plain_ms=10.0, transposed_ms=8.0)[1]  # within the 5% margin
    assert not _plan_with(panel_ms=9.0, plain_ms=10.0, transposed_ms=8.0)[1]


def test_tuning_with_the_kernel_is_all_or_nothing(monkeypatch):
    import mlx.core as mx

    from mlx_lora.serve import cpu_decode
    from mlx_lora.serve.panel_kernel import pack

    kernel = _kernel()
    weights = {(64, 32): [mx.ones((64, 32))], (32, 64): [mx.ones((32, 64))]}
    panels = {shape: [pack(w) for w in ws] for shape, ws in weights.items()}
    for wins in (True, False):
        monkeypatch.setattr(cpu_decode, "_panel_wins", lambda plan, by_shape, wins=wins: wins)
        plan = cpu_decode.tune_products(weights, 4, kernel=kernel, panels_by_shape=panels)
        chosen = {m for choices in plan.measured.values() for m in choices.values()}
        assert chosen == {"panel"} if wins else "panel" not in chosen
        assert set(plan.timings[((64, 32), 4)]) == {"plain", "transposed", "panel"}


def _fresh_load(monkeypatch, tmp_path, **env):
    from mlx_lora.serve import panel_kernel

    monkeypatch.setenv("MLX_LORA_KERNEL_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(panel_kernel, "_loaded", None)
    return panel_kernel.load()


def test_a_failed_build_is_said_in_one_line_and_not_retried(monkeypatch, tmp_path):
    pytest.importorskip("nanobind")
    from mlx_lora.serve import panel_kernel

    build = _fresh_load(monkeypatch, tmp_path, CXX="/bin/false")
    assert build.module is None and "\n" not in build.note
    assert "panel_matmul.cpp did not compile (/bin/false exit 1)" in build.note
    [failed] = tmp_path.glob("*/failed.txt")
    assert not list(tmp_path.glob("*/.build-*"))  # the build folder is removed
    monkeypatch.setattr(panel_kernel, "_build", lambda *a: pytest.fail("rebuilt after a recorded failure"))
    monkeypatch.setattr(panel_kernel, "_loaded", None)
    again = panel_kernel.load()
    assert again.module is None and "an earlier build failed" in again.note and f"delete {failed} to try again" in again.note


def test_unavailable_kernel_reasons(monkeypatch, tmp_path):
    from mlx_lora.serve import panel_kernel

    assert "off (MLX_LORA_NO_PANEL_KERNEL is set)" in _fresh_load(monkeypatch, tmp_path, MLX_LORA_NO_PANEL_KERNEL="1").note
    monkeypatch.delenv("MLX_LORA_NO_PANEL_KERNEL")
    pytest.importorskip("nanobind")
    monkeypatch.setattr(panel_kernel, "_mlx_nanobind_abi", lambda: "99")
    note = _fresh_load(monkeypatch, tmp_path).note
    assert "uses nanobind ABI v99" in note and "install the nanobind release with MLX's ABI" in note
    monkeypatch.undo()
    monkeypatch.setattr(panel_kernel, "_loaded", None)
    monkeypatch.setattr(panel_kernel, "_nanobind", lambda: None)
    assert "nanobind is not installed" in panel_kernel.load().note
    monkeypatch.setattr(panel_kernel, "_loaded", None)


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    import mlx.core as mx

    from mlx_lora.serve.panel_kernel import self_check

    class Wrong:
        @staticmethod
        def panel_matmul(x, panels, out):
            return mx.zeros((x.shape[0], out))

    assert "max error" in self_check(Wrong)
    kernel = _kernel()
    assert self_check(kernel) is None


def test_no_panels_without_memory_for_them(monkeypatch):
    import mlx.nn as nn

    from mlx_lora.serve import cpu_decode, decode_weights

    _kernel()
    model = nn.Module()
    model.layers = [nn.Linear(64, 64) for _ in range(3)]
    monkeypatch.setattr(decode_weights, "available_memory_bytes", lambda: 2 * 3 * 64 * 64 * 4)  # copies = half
    plan = cpu_decode.use_decode_products(model, 4)
    assert plan.kernel is None and "would take over half the available memory" in plan.kernel_note
    assert "panel" not in {m for choices in plan.measured.values() for m in choices.values()}


def test_two_processes_starting_at_once_build_the_kernel_once(tmp_path):
    """A fresh cache folder: one process builds (and checks) the kernel, the other waits and loads it."""
    import os
    import subprocess

    _kernel()  # skips where the kernel cannot be built
    script = "from mlx_lora.serve import panel_kernel as k; b = k.load(); print(b.module is not None, b.note)"
    env = {**os.environ, "MLX_LORA_KERNEL_DIR": str(tmp_path)}
    env.pop("MLX_LORA_NO_PANEL_KERNEL", None)
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    notes = [run.communicate(timeout=600)[0].strip() for run in runs]
    assert all(note.startswith("True panel kernel: ") for note in notes), notes
    assert sorted("built and checked" in note for note in notes) == [False, True], notes
    [built] = [p for p in tmp_path.glob("*/_panel_matmul*") if not p.name.endswith(".sha256")]
    assert not list(tmp_path.glob("*/failed.txt"))
    # A damaged cached file (a truncated one crashed dlopen with SIGBUS) is found by its digest and rebuilt.
    built.write_bytes(built.read_bytes()[:100_000])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("True panel kernel: damaged cached file rebuilt"), (run.stdout, run.stderr)


def test_a_killed_compiler_is_not_recorded_as_a_failed_build(monkeypatch, tmp_path):
    """A compiler killed by a signal (e.g. out of memory) may succeed next time: nothing is recorded."""
    pytest.importorskip("nanobind")
    fake = tmp_path / "killed-g++"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "fake 1.0"; exit 0; fi\nkill -9 $$\n')
    fake.chmod(0o755)
    build = _fresh_load(monkeypatch, tmp_path / "cache", CXX=str(fake))
    assert build.module is None and "did not compile" in build.note and "exit -9" in build.note
    assert not list((tmp_path / "cache").glob("*/failed.txt")) and not list((tmp_path / "cache").glob("*/.build-*"))
    monkeypatch.setenv("CXX", "g++ -Wall")
    from mlx_lora.serve import panel_kernel

    monkeypatch.setattr(panel_kernel, "_loaded", None)
    assert "$CXX ('g++ -Wall') is not a program on PATH" in panel_kernel.load().note


def test_a_kernel_that_loses_is_dropped_with_its_copies(monkeypatch):
    import mlx.nn as nn

    from mlx_lora.serve import cpu_decode

    _kernel()
    model = nn.Module()
    model.layers = [nn.Linear(64, 64) for _ in range(3)]
    monkeypatch.setattr(cpu_decode, "_panel_wins", lambda plan, by_shape: False)
    plan = cpu_decode.use_decode_products(model, 4)
    assert plan.kernel is None and "not chosen: the BLAS was faster at 4 rows" in plan.kernel_note
    assert all(getattr(layer, "_panels", None) is None for layer in model.layers)
    monkeypatch.setattr(cpu_decode, "_panel_wins", lambda plan, by_shape: True)
    model.layers = [nn.Linear(64, 64) for _ in range(3)]
    plan = cpu_decode.use_decode_products(model, 4)
    assert plan.kernel is not None and all(layer._panels is not None for layer in model.layers)
