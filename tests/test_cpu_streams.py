"""A training step split over CPU streams (cpu_streams.py) equals the step on one stream."""

import dataclasses
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora import cpu_streams
from mlx_lora.blas import blas_env, find_fast_blas
from mlx_lora.config import config_from_dict
from mlx_lora.cpu_streams import split_rows, stream_count
from mlx_lora.train import train

from test_train import CONFIG, Recorder, adapters_of, setup


class StartRecorder(Recorder):
    def on_start(self, info):
        self.info = info


@pytest.fixture(autouse=True)
def interleaved(monkeypatch):
    # what `mlx-lora train` sets; MLX read its width when this process first evaluated, so here the
    # groups may run one after the other: these tests check the arithmetic, not the overlap
    monkeypatch.setenv(cpu_streams.BFS_ENV, str(cpu_streams.BFS_WIDTH))


def run(tiny_model_dir, tiny_data_dir, out, streams, **kwargs):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    recorder = StartRecorder()
    config = dataclasses.replace(CONFIG, cpu_streams=streams)
    train(model, data["train"], data["valid"], config, out, callbacks=[recorder], **kwargs)
    assert recorder.info["cpu_streams"] == streams  # the split really ran
    return [r.train_loss for r in recorder.reports], adapters_of(model)


@pytest.mark.parametrize("streams", [2, 3])
def test_a_step_split_over_streams_equals_the_step_on_one(tiny_model_dir, tiny_data_dir, tmp_path, streams):
    # CONFIG: batch 4 with 2 micro-batches accumulated; 3 streams split 4 rows unevenly (1, 2, 1)
    one_losses, one = run(tiny_model_dir, tiny_data_dir, tmp_path / "one", 1)
    split_losses, split = run(tiny_model_dir, tiny_data_dir, tmp_path / "split", streams)
    np.testing.assert_allclose(split_losses, one_losses, rtol=1e-4)
    for key in one:
        np.testing.assert_allclose(split[key], one[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_packed_rows_split_over_streams_equal_one_stream(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    capacity = max(e.length for e in data["train"]) + 8  # rows of 1-2 examples: 2-4 rows a batch
    one_losses, one = run(tiny_model_dir, tiny_data_dir, tmp_path / "one", 1, pack_capacity=capacity)
    split_losses, split = run(tiny_model_dir, tiny_data_dir, tmp_path / "split", 2, pack_capacity=capacity)
    np.testing.assert_allclose(split_losses, one_losses, rtol=1e-4)
    for key in one:
        np.testing.assert_allclose(split[key], one[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_split_rows_keeps_order_and_balances_groups():
    tokens, mask = np.arange(10).reshape(5, 2), np.ones((5, 1))
    groups = split_rows([tokens, mask], 3)
    assert [g[0].shape[0] for g in groups] == [2, 1, 2] or [g[0].shape[0] for g in groups] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([g[0] for g in groups]), tokens)
    assert all(g[1].shape[0] == g[0].shape[0] for g in groups)


def test_stream_count_follows_the_device_the_rows_and_the_settings(monkeypatch):
    monkeypatch.setattr(cpu_streams, "usable_cores", lambda: 2)

    def count(rows, on_cpu=True, **settings):
        return stream_count(dataclasses.replace(CONFIG, **settings), rows, on_cpu)

    assert count(4) == 2  # auto: one per core
    assert count(1) == 1
    assert count(4, on_cpu=False) == 1
    assert count(2, cpu_streams=3) == 2 and count(4, cpu_streams=3) == 3
    assert count(8, cpu_streams=1) == 1
    assert count(4, grad_checkpoint=True) == 1
    assert count(4, objective="dpo") == 1
    monkeypatch.setenv(cpu_streams.BFS_ENV, "20")  # MLX would run the groups one after the other
    assert count(4) == 1
    assert stream_count(CONFIG, 4, True, interleaved=True) == 2  # the planner: as `mlx-lora train` runs it


def test_train_sets_the_width_only_for_runs_that_split(monkeypatch):
    monkeypatch.delenv(cpu_streams.BFS_ENV)
    assert not cpu_streams.prepare_process(dataclasses.replace(CONFIG, grad_checkpoint=True))
    assert cpu_streams.BFS_ENV not in os.environ
    assert not cpu_streams.prepare_process(dataclasses.replace(CONFIG, cpu_streams=1))
    assert cpu_streams.prepare_process(CONFIG)
    assert os.environ[cpu_streams.BFS_ENV] == str(cpu_streams.BFS_WIDTH)
    monkeypatch.setenv(cpu_streams.BFS_ENV, "4096")  # the user's own stays
    assert cpu_streams.prepare_process(CONFIG) and os.environ[cpu_streams.BFS_ENV] == "4096"


CHECK_THREADS = """
from mlx_lora.cpu_streams import _blas_thread_functions, blas_threads
get, _ = _blas_thread_functions()
before = get()
with blas_threads(1):
    inside = get()
print(before, inside, get())
"""


def test_blas_threads_sets_and_restores_the_count_of_the_preloaded_blas():
    path = find_fast_blas()
    if path is None:
        pytest.skip("no OpenBLAS or MKL on this machine (MLX's reference BLAS is single-threaded)")
    env = {**os.environ, **blas_env(path), "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", CHECK_THREADS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1", "2"]


@pytest.mark.parametrize("value", [0, -1, "two", True])
def test_a_bad_cpu_streams_value_is_named(value):
    with pytest.raises(ValueError, match="training.cpu_streams"):
        config_from_dict({"model": "m", "training": {"cpu_streams": value}})


def test_the_planner_counts_a_gradient_per_group_and_the_working_sets_once():
    from mlx_lora.memory.estimate import StepSettings, components
    from mlx_lora.memory.shape import ModelShape

    shape = ModelShape(model_type="llama", hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                       vocab=49152, tied=True, dtype_bytes=2)
    one = components(shape, StepSettings(batch_size=4, seq_length=72))
    two = components(shape, StepSettings(batch_size=4, seq_length=72, cpu_streams=2))
    assert two["gradients"] == 2 * one["gradients"]
    assert {k: v for k, v in two.items() if k != "gradients"} == {k: v for k, v in one.items() if k != "gradients"}
    # more streams than rows: one group a row
    assert components(shape, StepSettings(batch_size=2, cpu_streams=8))["gradients"] == \
        components(shape, StepSettings(batch_size=2, cpu_streams=2))["gradients"]
