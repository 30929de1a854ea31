"""Data-parallel training on MLX: batch shares, launch checks, and real 2-rank runs under mlx.launch.

The `slow` tests start `mlx-lora train -n 2` (mlx.launch, ring backend on localhost) on a tiny
model and compare with single-process runs of the same global batch and seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lora import distributed
from mlx_lora.distributed import World, check_batch_size
from mlx_lora.launch import compare_fingerprints, launch_command, read_hosts

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # relative, on every loss and on each adapter tensor (norm of the difference / norm)
# torch + bitsandbytes NF4 on CPU: the per-rank matmuls have other shapes (2 rows, not 4) and round
# differently; after 4 AdamW steps at lr 1e-2 the adapters differ by up to ~2e-5 (test_cuda_backend's 1e-4).
TORCH_TOLERANCE = 1e-4


# --- fast: the pieces ------------------------------------------------------------------------------

def test_batch_not_divisible_names_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"batch_size=6 .* 4 ranks; use training.batch_size=4 or 8"):
        check_batch_size(6, 4)
    with pytest.raises(ValueError, match=r"use training.batch_size=3$"):
        check_batch_size(2, 3)
    check_batch_size(8, 4)
    check_batch_size(5, 1)


def test_a_world_of_one_changes_nothing():
    world = distributed.init("any")  # not started by mlx.launch
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    tokens, mask = np.arange(12).reshape(3, 4), np.ones((3, 3), np.float32)
    shared = list(world.share(iter([(tokens, mask, 12)])))
    assert shared[0][0] is tokens and shared[0][3] == 1.0
    x = mx.array([1.0, 2.0])
    assert world.average(x) is x and world.average_gradients({"a": x})["a"] is x
    assert world.any(False) is False and world.any(True) is True and world.seed(7) == 7


def test_timing_the_all_reduce_needs_an_uncompiled_step(tmp_path):
    from mlx_lora.config import TrainingConfig
    from mlx_lora.train import train

    timed = World(time_all_reduce=True)
    with pytest.raises(ValueError, match="timing the gradient all-reduce .* set training.compile=false"):
        train(None, [], [], TrainingConfig(compile=True), tmp_path, world=timed)
    grad = {"a": mx.array([1.0, 2.0])}
    assert timed.average_gradients(grad) is grad and timed.all_reduce_s == []  # a world of one: nothing to time


def test_rank_shares_are_disjoint_and_their_weighted_mean_is_the_global_mean():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (8, 10))
    mask = (rng.random((8, 9)) < 0.4).astype(np.float32)
    losses = rng.random((8, 9)).astype(np.float32)  # per-token losses of the global batch
    global_mean = (losses * mask).sum() / mask.sum()
    rows, combined = [], 0.0
    for rank in range(4):
        world = World(rank=rank, size=4)
        part, part_mask, n_tokens, weight = next(world.share(iter([(tokens, mask, 80)])))
        rows += [tuple(r) for r in part]
        rank_losses = losses[2 * rank: 2 * rank + 2]
        combined += (rank_losses * part_mask).sum() / part_mask.sum() * weight / 4  # what average() computes
        assert n_tokens == 80  # reports count the global batch
    assert sorted(rows) == sorted(tuple(r) for r in tokens)  # every row once
    assert combined == pytest.approx(global_mean, rel=1e-6)


def test_hosts_file_errors_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "hosts.json"
    bad.write_text('[{"ssh": "mac1", "ips": ["10.0.0.1"]}\n {"ssh": "mac2"}]')
    with pytest.raises(ValueError, match=r"hosts.json:2:2: not valid JSON"):
        read_hosts(bad)
    bad.write_text('[{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ips": ["10.0.0.2"]}]')
    with pytest.raises(ValueError, match=r'hosts\[1\] needs an "ssh" name'):
        read_hosts(bad)
    bad.write_text('{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]}')
    with pytest.raises(ValueError, match=r"hosts\[1\] \(mac2\): the ring backend needs"):
        read_hosts(bad, "ring")
    bad.write_text('[{"ssh": "mac1", "ips": ["mac1.local"]}]')
    with pytest.raises(ValueError, match=r"'mac1.local' is not an IP address"):
        read_hosts(bad)
    with pytest.raises(FileNotFoundError, match="nope.json: file not found"):
        read_hosts(tmp_path / "nope.json")
    good = tmp_path / "good.json"
    good.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]')
    assert [h.ssh for h in read_hosts(good, "ring")] == ["127.0.0.1"] * 2


def test_mismatched_versions_and_files_name_the_host():
    base = {"host": "mac1", "mlx-lora": "0.1.0", "mlx": "0.32.4", "model": "aaa", "data": "ddd",
            "model_path": "/m", "data_path": "/d"}
    assert compare_fingerprints([base, dict(base, host="mac2")]) == []
    problems = compare_fingerprints([base, dict(base, host="mac2", **{"mlx-lora": "0.2.0"}), dict(base, host="mac3", model="bbb")])
    assert problems[0].startswith("rank 1 (mac2) has mlx-lora 0.2.0, rank 0 (mac1) has 0.1.0: install the same mlx-lora")
    assert problems[1].startswith("rank 2 (mac3) has model bbb at /m") and "copy the same model" in problems[1]


def test_ranks_with_other_inputs_are_refused_before_training_naming_the_host(monkeypatch, tmp_path):
    from mlx_lora import launch

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    mine = launch.fingerprint(tmp_path / "model", tmp_path / "data")
    theirs = dict(mine, host="mac2", model=launch.tree_digest(Path(__file__)))  # other model files there
    monkeypatch.setattr(distributed, "gather_strings", lambda world, text: [text, json.dumps(theirs)])
    with pytest.raises(ValueError, match=r"^refused before training: rank 1 \(mac2\) has model \w+ at .*model, "
                                         r"rank 0 \(.*\) has \w+: copy the same model files to every host$"):
        launch.check_same_inputs(World(rank=0, size=2), tmp_path / "model", tmp_path / "data")
    monkeypatch.setattr(distributed, "gather_strings", lambda world, text: [text, text])
    launch.check_same_inputs(World(rank=1, size=2), tmp_path / "model", tmp_path / "data")


def test_launch_command_wraps_mlx_launch_with_the_configured_backend():
    command = launch_command(["train", "cfg.yaml", "--resume"], 2, None, "ring")
    assert Path(command[0]).name == "mlx.launch"
    assert command[1:6] == ["--backend", "ring", "-n", "2", "--"]
    assert command[6:] == [sys.executable, "-m", "mlx_lora", "train", "cfg.yaml", "--resume"]
    assert "--backend" not in launch_command(["train"], None, "hosts.json", "any")  # mlx.launch picks


def test_a_lost_link_raises_rankfailed_after_rank0_saved_the_last_finished_step():
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_lora.data import BatchPosition
    from mlx_lora.distributed import RankFailed

    model, optimizer = nn.Linear(2, 2), optim.Adam(learning_rate=0.1)
    optimizer.init(model.trainable_parameters())
    world, saved = World(rank=0, size=2), []
    world.keep(2, BatchPosition(0, 2), model, optimizer)  # where this run started
    with pytest.raises(RankFailed, match=r"rank 0 .*lost the link.*saved step 3 in ckpt-3; resume with --resume"):
        with world.guard(lambda good: saved.append(good) or f"ckpt-{good.step}"):
            model.weight = model.weight * 2  # step 3, finished by every rank
            world.keep(3, BatchPosition(0, 3), model, optimizer)
            kept_weight = model.weight
            model.weight = model.weight + 1  # a half-done step 4: not what gets saved
            raise RuntimeError("[ring] connection to a peer was lost")
    assert saved[0].adapters["weight"] is kept_weight and (saved[0].epoch, saved[0].index) == (0, 3)
    with pytest.raises(ValueError, match="not a collective"):  # other errors pass through untouched
        with world.guard(lambda good: None):
            raise ValueError("not a collective")


def test_a_silent_peer_ends_the_rank_after_the_timeout_with_a_message():
    code = (
        "import time\n"
        "from mlx_lora.distributed import World\n"
        "world = World(rank=1, size=2, timeout_s=1.0)\n"
        "with world.guard(lambda good: 'unused'):\n"
        "    time.sleep(60)  # what a rank stuck in a collective does\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert "error: rank 1" in done.stderr and "distributed.timeout_s=1" in done.stderr
    assert "rank 0 writes them" in done.stderr and "resume with --resume" in done.stderr


def test_launcher_status_is_failure_when_any_rank_failed(capfd):
    from mlx_lora.launch import run_launcher

    def fake(lines):
        return [sys.executable, "-c", f"import sys; sys.stderr.write({lines!r})"]

    assert run_launcher(fake("rank output\n")) == 0
    assert run_launcher(fake("\x1b[33m[WARN] Node with rank 1 exited with code -9 \x1b[0m\n")) == 1
    assert run_launcher(fake("[WARN] Node with rank 1 exited with code 130\n[WARN] Node with rank 0 exited with code -15\n")) == 130
    assert run_launcher(fake("[WARN] Node with rank 0 exited with code 1\n[WARN] Node with rank 1 was killed\n")) == 1
    assert "Node with rank 1 was killed" in capfd.readouterr().err  # relayed, not swallowed


def cli(*args, cwd=None, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "mlx_lora", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def write_config(folder: Path, model_dir: Path, data_dir: Path, **training) -> Path:
    settings = {"iters": 6, "batch_size": 4, "learning_rate": 3e-3, "steps_per_report": 1, "steps_per_eval": 3,
                "val_batches": 2, "save_every": 0, **training}
    config = {"model": str(model_dir), "seed": 0, "data": {"path": str(data_dir)}, "quantization": {"mode": "none"},
              "lora": {"rank": 4, "alpha": 8}, "training": settings, "eval": {"enabled": False},
              "distributed": {"backend": "ring", "timeout_s": 120}}
    path = folder / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_bad_launch_input_is_one_line_before_anything_starts(tiny_model_dir, tiny_data_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    done = cli("train", config, "-n", "3", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: training.batch_size=4 is the global batch and must divide by the 3 ranks; "
                                   "use training.batch_size=3 or 6")
    hosts = tmp_path / "hosts.json"
    hosts.write_text("[{'ssh': 'mac2'}]")
    done = cli("train", config, "--hosts", hosts)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and f"{hosts}:1:3: not valid JSON" in done.stderr
    hosts.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "no-such-host.invalid", "ips": ["10.9.9.9"]}]')
    done = cli("train", config, "--hosts", hosts)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "host no-such-host.invalid is unreachable over ssh" in done.stderr
    assert not (tmp_path / "run").exists()


# --- slow: real ranks under mlx.launch ------------------------------------------------------------

def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, tolerance: float = TOLERANCE) -> None:
    got, want = metrics(run), metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("train_loss", "val_loss", "tokens"):
        a = np.array([r.get(key, np.nan) for r in got], np.float64)
        b = np.array([r.get(key, np.nan) for r in want], np.float64)
        np.testing.assert_allclose(a, b, rtol=tolerance, equal_nan=True, err_msg=key)
    a, b = mx.load(str(run / "adapters.safetensors")), mx.load(str(reference / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    for key in b:
        x, y = np.array(a[key], np.float64), np.array(b[key], np.float64)
        assert np.linalg.norm(x - y) <= tolerance * np.linalg.norm(y), key


def train_run(config: Path, out: Path, *extra) -> Path:
    done = cli("train", config, *extra, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plain_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The same config trained by one process and by 2 ranks (global batch 4 both times)."""
    folder = tmp_path_factory.mktemp("dp")
    config = write_config(folder, tiny_model_dir, tiny_data_dir)
    return {"config": config, "one": train_run(config, folder / "one"),
            "two": train_run(config, folder / "two", "-n", "2")}


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_global_batch(plain_runs):
    two = plain_runs["two"]
    assert_same_run(two, plain_runs["one"])
    assert json.loads((two / "run_summary.json").read_text())["ranks"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in plain_runs["one"].iterdir())


@pytest.mark.slow
def test_accumulation_on_two_ranks_equals_one_rank_with_the_doubled_micro_batch(tiny_model_dir, tiny_data_dir, tmp_path):
    # 2 ranks x 2 rows x 2 micro-batches == 1 process x 4 rows x 2 micro-batches
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir, iters=4, grad_accumulation=2, steps_per_eval=0)
    assert_same_run(train_run(config, tmp_path / "two", "-n", "2"), train_run(config, tmp_path / "one"))


def rank_pid(marker: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"I14_RUN={marker}".encode() in environ and f"MLX_RANK={rank}".encode() in environ:
            if b"mlx_lora" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_a_checkpoint_and_resume_matches(plain_runs, tmp_path):
    config, out, marker = plain_runs["config"], tmp_path / "killed", uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), "I14_RUN": marker}
    with open(tmp_path / "log.txt", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "mlx_lora", "train", str(config), "-n", "2",
                                     f"output_dir={out}", "distributed.timeout_s=60"], stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 600
            while not ((out / "metrics.jsonl").is_file() and metrics(out)[-1]["step"] >= 2):
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
                time.sleep(0.2)
            os.kill(rank_pid(marker, 1), signal.SIGKILL)
            launcher.wait(timeout=60 + 30)  # distributed.timeout_s plus time to write the checkpoint
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = (tmp_path / "log.txt").read_text()
    assert launcher.returncode != 0, text  # and it ended within the wait above: no hang
    assert "rank 0" in text and ("lost the link to another rank" in text or "no word from the other ranks" in text), text
    assert "resume with --resume" in text
    saved = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json").read_text())
    assert 2 <= saved["step"] < 6
    assert_same_run(train_run(config, out, "-n", "2", "--resume"), plain_runs["two"])


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(plain_runs, tmp_path):
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    out = tmp_path / "interrupted"
    with open(tmp_path / "log.txt", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "mlx_lora", "train", str(plain_runs["config"]), "-n", "2",
                                     f"output_dir={out}"], stdout=log, stderr=log, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 600
            while not ((out / "metrics.jsonl").is_file() and metrics(out)[-1]["step"] >= 2):
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
                time.sleep(0.2)
            os.killpg(launcher.pid, signal.SIGINT)
            launcher.wait(timeout=180)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    text = (tmp_path / "log.txt").read_text()
    assert launcher.returncode == 130, text
    assert text.count("interrupted") >= 2, text  # both ranks stopped on the signal, none was killed
    saved = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json").read_text())
    assert saved["step"] == metrics(out)[-1]["step"] >= 2


@pytest.mark.slow
def test_doctor_hosts_joins_the_ring_and_compares_inputs(plain_runs, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]')
    done = cli("doctor", "--hosts", hosts, plain_runs["config"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hosts         2 reachable: 127.0.0.1, 127.0.0.1" in done.stdout
    assert "ring          ring ok: 2 ranks joined (ring); same mlx-lora, mlx, model and data on every host" in done.stdout


# --- the CUDA backend under accelerate (DDP over gloo on CPU) ------------------------------------

@pytest.mark.slow
def test_cuda_backend_under_accelerate_on_two_processes_equals_one_process(tmp_path):
    """`accelerate launch` with 2 processes, global batch 4, equals one process with batch 4.

    On CPU, `accelerate launch --cpu` starts several processes only through mpirun; `--multi_gpu`
    starts them with torchrun, and ACCELERATE_USE_CPU=1 makes each one a CPU (gloo) rank.
    """
    pytest.importorskip("peft", reason="the CUDA backend needs the cuda extra: pip install -e '.[cuda]'")
    pytest.importorskip("bitsandbytes", reason="the CUDA backend needs the cuda extra: pip install -e '.[cuda]'")
    from tiny import write_chat_split
    from tiny_torch import make_torch_model_dir

    model_dir, data_dir = make_torch_model_dir(tmp_path / "model"), write_chat_split(tmp_path / "data")
    config = write_config(tmp_path, model_dir, data_dir, iters=4, steps_per_eval=4, learning_rate=1e-2)
    env = {"ACCELERATE_USE_CPU": "1"}
    settings = ["backend=cuda", "quantization.mode=nf4", "quantization.double_quant=true"]
    one = cli("train", config, *settings, f"output_dir={tmp_path / 'one'}", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mlx_lora", "train", str(config),
                          *settings, f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_summary.json").read_text())["processes"] == 2
    assert_same_run(tmp_path / "two", tmp_path / "one", TORCH_TOLERANCE)
