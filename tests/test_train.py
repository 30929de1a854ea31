"""The training loop: loss goes down, resume is exact, Ctrl-C and NaN leave good checkpoints."""

import dataclasses
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import DataConfig, LoraConfig, TrainingConfig
from mlx_lora.data import load_datasets
from mlx_lora.frozen_matmul import use_fast_frozen_layers
from mlx_lora.lora import apply_lora
from mlx_lora.models import load_model
from mlx_lora.train import TrainingStopped, learning_rate_schedule, train


def setup(model_dir, data_dir, seed=0):
    model, tokenizer, _ = load_model(str(model_dir))
    use_fast_frozen_layers(model)
    mx.random.seed(seed)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    datasets, _ = load_datasets(DataConfig(path=str(data_dir)), tokenizer)
    return model, datasets


class Recorder:
    def __init__(self, interrupt_at=None):
        self.reports, self.interrupt_at, self.interrupted = [], interrupt_at, None

    def on_start(self, info):
        pass

    def on_report(self, report):
        self.reports.append(report)
        if report.step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    def on_checkpoint(self, path):
        pass

    def on_interrupt(self, step, path):
        self.interrupted = (step, path)

    def on_end(self, summary):
        pass


CONFIG = TrainingConfig(iters=12, batch_size=4, learning_rate=3e-3, steps_per_report=1, steps_per_eval=6,
                        val_batches=2, save_every=4, lr_schedule="cosine", warmup_steps=2, grad_accumulation=2)


def adapters_of(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_loss_goes_down(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    recorder = Recorder()
    config = TrainingConfig(iters=30, batch_size=4, learning_rate=1e-2, steps_per_report=1, steps_per_eval=0)
    train(model, data["train"], data["valid"], config, tmp_path, callbacks=[recorder])
    losses = [r.train_loss for r in recorder.reports]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(r.tokens > 0 and r.peak_memory_gb > 0 for r in recorder.reports)


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    straight = Recorder()
    train(model, data["train"], data["valid"], CONFIG, tmp_path / "straight", callbacks=[straight])
    expected = adapters_of(model)

    model, data = setup(tiny_model_dir, tiny_data_dir)
    first = Recorder(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(model, data["train"], data["valid"], CONFIG, tmp_path / "resumed", callbacks=[first])
    assert first.interrupted[0] == 5 and first.interrupted[1].name == "step_000005"

    model, data = setup(tiny_model_dir, tiny_data_dir, seed=123)  # different init: the checkpoint must win
    second = Recorder()
    train(model, data["train"], data["valid"], CONFIG, tmp_path / "resumed", resume=True, callbacks=[second])
    assert [r.step for r in second.reports][0] == 6
    got = adapters_of(model)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    straight_losses = [r.train_loss for r in straight.reports]
    resumed_losses = [r.train_loss for r in first.reports + second.reports]
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-5)


def test_ctrl_c_during_the_last_step_is_not_lost(tiny_model_dir, tiny_data_dir, tmp_path):
    # the loop ends with the step, so the request is read after it: the run is complete and says so
    # (the CLI then skips evaluation and exits as interrupted)
    model, data = setup(tiny_model_dir, tiny_data_dir)
    config = dataclasses.replace(CONFIG, iters=4, steps_per_eval=0)
    summary = train(model, data["train"], data["valid"], config, tmp_path, callbacks=[Recorder(interrupt_at=4)])
    assert summary["steps"] == 4 and summary.get("interrupted") is True
    quiet = train(*setup(tiny_model_dir, tiny_data_dir)[:1], data["train"], data["valid"], config, tmp_path / "quiet")
    assert "interrupted" not in quiet


def test_an_interrupt_between_reports_reports_the_steps_it_applied(tiny_model_dir, tiny_data_dir, tmp_path):
    config = dataclasses.replace(CONFIG, steps_per_report=3)  # checkpoints at 4 and 8, reports at 3, 6, 9, 12
    model, data = setup(tiny_model_dir, tiny_data_dir)
    straight = Recorder()
    train(model, data["train"], data["valid"], config, tmp_path / "straight", callbacks=[straight])

    class InterruptAtCheckpoint(Recorder):
        def on_checkpoint(self, path):
            if path.name == "step_000004":
                os.kill(os.getpid(), signal.SIGINT)

    model, data = setup(tiny_model_dir, tiny_data_dir)
    first = InterruptAtCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        train(model, data["train"], data["valid"], config, tmp_path / "resumed", callbacks=[first])
    assert [r.step for r in first.reports] == [3, 4]  # step 4 was applied and checkpointed: it is reported
    model, data = setup(tiny_model_dir, tiny_data_dir)
    second = Recorder()
    train(model, data["train"], data["valid"], config, tmp_path / "resumed", resume=True, callbacks=[second])
    resumed = first.reports + second.reports
    assert sum(r.tokens for r in resumed) == sum(r.tokens for r in straight.reports)  # no step lost or doubled
    window = lambda reports: [r.step - (reports[i - 1].step if i else 0) for i, r in enumerate(reports)]  # noqa: E731
    np.testing.assert_allclose(sum(r.train_loss * n for r, n in zip(resumed, window(resumed))),
                               sum(r.train_loss * n for r, n in zip(straight.reports, window(straight.reports))),
                               rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    config = TrainingConfig(iters=10, batch_size=4, save_every=1, steps_per_eval=0)

    class PoisonAfterSecondCheckpoint(Recorder):
        def on_checkpoint(self, path):
            if path.name == "step_000002":  # a diverged update, as a too-high learning rate makes
                layer = model.model.layers[0].self_attn.q_proj
                layer.lora_a = layer.lora_a * float("inf")

    with pytest.raises(TrainingStopped, match=r"loss became nan at step 3; stopped \(the last good checkpoint is .*step_000002"):
        train(model, data["train"], data["valid"], config, tmp_path, callbacks=[PoisonAfterSecondCheckpoint()])
    from mlx_lora.checkpoints import latest

    checkpoint = latest(tmp_path)
    weights = mx.load(str(checkpoint / "adapters.safetensors"))
    assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values())


def test_schedules_warm_up_and_decay():
    config = TrainingConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    schedule = learning_rate_schedule(config, 24)
    values = [schedule(s).item() for s in range(24)]
    assert values[0] == pytest.approx(0.25) and values[3] == pytest.approx(1.0)
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    linear = learning_rate_schedule(TrainingConfig(learning_rate=2.0, lr_schedule="linear"), 10)
    assert linear(0).item() == pytest.approx(2.0) and linear(5).item() == pytest.approx(1.0)


def test_early_stop_ends_when_validation_loss_stalls(tiny_model_dir, tiny_data_dir, tmp_path):
    from dataclasses import replace

    model, data = setup(tiny_model_dir, tiny_data_dir)
    # A learning rate too small to move the loss: every evaluation after the first is stale.
    config = replace(CONFIG, iters=40, learning_rate=1e-9, steps_per_eval=2, save_every=0, grad_accumulation=1,
                     early_stop_patience=2)
    summary = train(model, data["train"], data["valid"], config, tmp_path, callbacks=[Recorder()])
    assert summary["stopped_early"] and summary["planned_steps"] == 40
    assert summary["steps"] == 6  # evaluations at 2 (best), 4 and 6 (stale twice)
    assert [row["step"] for row in summary["val_history"]] == [2, 4, 6]
    assert (tmp_path / "checkpoints").is_dir()


def test_still_improving_says_when_validation_loss_was_falling():
    from mlx_lora.train import still_improving

    assert still_improving([{"step": 10, "val_loss": 1.0}, {"step": 20, "val_loss": 0.8}]) == (1.0, 0.8)
    assert still_improving([{"step": 10, "val_loss": 1.0}, {"step": 20, "val_loss": 0.995}]) is None
    assert still_improving([{"step": 10, "val_loss": 1.0}]) is None


def test_packed_training_equals_unpacked_and_resumes_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    """Packing changes the rows, not the step: the same losses and adapters as unpacked batches."""
    model, data = setup(tiny_model_dir, tiny_data_dir)
    capacity = 2 * max(e.length for e in data["train"])
    unpacked = Recorder()
    train(model, data["train"], data["valid"], CONFIG, tmp_path / "unpacked", callbacks=[unpacked])
    expected = adapters_of(model)

    model, data = setup(tiny_model_dir, tiny_data_dir)
    first = Recorder(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(model, data["train"], data["valid"], CONFIG, tmp_path / "packed", callbacks=[first], pack_capacity=capacity)
    model, data = setup(tiny_model_dir, tiny_data_dir, seed=123)
    second = Recorder()
    train(model, data["train"], data["valid"], CONFIG, tmp_path / "packed", resume=True, callbacks=[second],
          pack_capacity=capacity)
    packed_losses = [r.train_loss for r in first.reports + second.reports]
    np.testing.assert_allclose(packed_losses, [r.train_loss for r in unpacked.reports], rtol=1e-4)
    got = adapters_of(model)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_packing_refuses_what_it_cannot_run(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = setup(tiny_model_dir, tiny_data_dir)
    config = TrainingConfig(iters=1, batch_size=4, steps_per_eval=0, objective="orpo")
    with pytest.raises(ValueError, match="data.pack"):
        train(model, data["train"], data["valid"], config, tmp_path, pack_capacity=512)


def test_the_memory_guard_reports_the_steps_it_stops_after_and_ends_the_progress_line(tiny_model_dir, tiny_data_dir,
                                                                                      tmp_path):
    import dataclasses

    from mlx_lora.train import MemoryLimitExceeded

    model, datasets = setup(tiny_model_dir, tiny_data_dir)
    recorder = Recorder()
    closed = []
    recorder.close = lambda: closed.append(True)
    config = dataclasses.replace(CONFIG, steps_per_report=5, grad_accumulation=1, steps_per_eval=0)
    with pytest.raises(MemoryLimitExceeded) as stopped:
        train(model, datasets["train"], [], config, tmp_path, callbacks=[recorder], memory_limit=1e6)
    assert "over the memory limit of 1.0 MB" in str(stopped.value)  # not "0.00 GB"
    # step 1 tripped the guard before its report was due: it was applied (checkpointed), so it is reported
    assert [r.step for r in recorder.reports] == [1] and np.isfinite(recorder.reports[0].train_loss)
    assert closed == [True]
