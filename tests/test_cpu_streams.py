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

from test_objectives import setup as setup_pairs
from test_objectives import pairs_dir  # noqa: F401 - the fixture
from test_train import CONFIG, Recorder, adapters_of, setup

PREFERENCE = config_from_dict({"model": "m", "data": {"path": "d"}, "training": {
    "iters": 4, "batch_size": 3, "grad_accumulation": 2, "learning_rate": 5e-3, "steps_per_report": 1,
    "steps_per_eval": 0, "save_every": 0, "objective": "dpo", "beta": 0.2}}).training


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


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
@pytest.mark.parametrize("streams", [2, 3])
def test_preference_pairs_split_over_streams_equal_one_stream(tiny_model_dir, pairs_dir, tmp_path, objective, streams):
    # batch 3 pairs, accumulated over 2 micro-batches: 2 streams split them 2 / 1, so a group's own
    # means (not the whole batch's) would weigh its pairs and NLL tokens wrongly and fail this
    config = dataclasses.replace(PREFERENCE, objective=objective)

    def run_pairs(count, out):
        model, _, data, _ = setup_pairs(tiny_model_dir, pairs_dir, objective)
        recorder = StartRecorder()
        train(model, data["train"], data["valid"], dataclasses.replace(config, cpu_streams=count), out,
              callbacks=[recorder])
        assert recorder.info["cpu_streams"] == count
        return recorder.reports, adapters_of(model)

    one_reports, one = run_pairs(1, tmp_path / "one")
    split_reports, split = run_pairs(streams, tmp_path / "split")
    for name in ("train_loss", "reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"):
        np.testing.assert_allclose([getattr(r, name) for r in split_reports], [getattr(r, name) for r in one_reports],
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    for key in one:  # AdamW turns float32 rounding in near-zero gradients into whole steps: looser here
        np.testing.assert_allclose(split[key], one[key], rtol=1e-3, atol=1e-3, err_msg=key)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_groups_losses_metrics_and_gradients_add_up_to_the_batch(tiny_model_dir, pairs_dir, objective):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_lora.objectives import preference_loss, reference_logps
    from mlx_lora.preference_data import collate_pairs

    config = dataclasses.replace(PREFERENCE, objective=objective)
    model, _, data, _ = setup_pairs(tiny_model_dir, pairs_dir, objective, nonzero_b=True)
    tokens, masks, _ = collate_pairs(data["train"], [0, 1, 2])
    reference = reference_logps(model, mx.array(tokens), mx.array(masks[0])) if objective == "dpo" else None
    loss_and_grad = nn.value_and_grad(model, lambda m, i: preference_loss(
        m, i["tokens"], i["masks"], i.get("reference"), config, i.get("totals")))

    def inputs(rows, totals=None):
        group = {"tokens": mx.array(tokens[rows]), "masks": mx.array(masks[:, rows])}
        if reference is not None:
            group["reference"] = reference[mx.array(rows)]
        return {**group, "totals": totals} if totals is not None else group

    (loss, metrics), grad = loss_and_grad(model, inputs(np.arange(6)))
    totals = mx.array([3, float(masks[1, :3].sum())])
    parts = [loss_and_grad(model, inputs(rows, totals)) for rows in cpu_streams.split_pairs(3, 2)]
    assert sum(p[0][0] for p in parts).item() == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(sum(p[0][1] for p in parts)), np.array(metrics), rtol=1e-5, atol=1e-5)
    whole = dict(tree_flatten(grad))
    summed = {k: sum(dict(tree_flatten(p[1]))[k] for p in parts) for k in whole}
    for key, value in whole.items():
        np.testing.assert_allclose(np.array(summed[key]), np.array(value), rtol=1e-4,
                                   atol=1e-6 * float(mx.abs(value).max()), err_msg=key)


def test_split_pairs_keeps_each_pair_whole():
    groups = cpu_streams.split_pairs(5, 2)
    assert [g.tolist() for g in groups] in ([[0, 1, 2, 5, 6, 7], [3, 4, 8, 9]], [[0, 1, 5, 6], [2, 3, 4, 7, 8, 9]])


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
    assert count(4, objective="dpo") == 2  # pairs
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
