"""Resumable checkpoints and atomic file writes.

A checkpoint is a folder `checkpoints/step_000120/` with `adapters.safetensors`,
`optimizer.safetensors` (AdamW moments, step count) and `state.json` (step, data position,
elapsed time). Random draws (dropout) are seeded from (seed, step), so they need no saving. It is written under a temporary name and renamed into place, so a
crash never leaves a half checkpoint; `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

STATE_VERSION = 1


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.fchmod(handle, 0o666 & ~UMASK)  # mkstemp makes it private; the result is an ordinary file
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(path: str | Path):
    """Yield an empty staging folder next to `path`; it replaces `path` only if the block succeeds.

    A crash mid-write leaves the previous folder (or none) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None) -> None:
    """Atomically write MLX arrays as safetensors."""
    import mlx.core as mx

    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def load_safetensors(path: str | Path, fix: str) -> dict:
    """The arrays of a safetensors file (`mx.load`).

    Raises FileNotFoundError when it is missing and ValueError when it is truncated or corrupt,
    each naming the file and `fix` (what the user can do), in one line.
    """
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; {fix}")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({safetensors_problem(err)}); {fix}") from None


def safetensors_problem(err: Exception) -> str:
    """MLX's load error, without its `[load_safetensors]` tag and its generic last sentence."""
    text = str(err).replace("[load_safetensors] ", "").strip()
    return text.split(" Perhaps ")[0].rstrip(".") or type(err).__name__


def unreadable_safetensors(folder: Path) -> list[str]:
    """The *.safetensors files of `folder` that MLX cannot open (truncated, corrupt), each with why."""
    import mlx.core as mx

    bad = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as err:
            bad.append(f"{path.name} ({safetensors_problem(err)})")
    return bad


CHECKPOINT_DIRNAME = "checkpoints"  # <output_dir>/checkpoints/step_NNNNNN


def run_file(folder: str | Path, name: str) -> Path:
    """`folder / name`, or for a run's checkpoint folder (checkpoints/step_N) lacking it, the run's own
    (adapter_config.json, train_config.yaml live in the run folder)."""
    folder = Path(folder)
    path = folder / name
    if not path.is_file() and folder.parent.name == CHECKPOINT_DIRNAME:
        return folder.parent.parent / name
    return path


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIRNAME


def write_checkpoint(output_dir: Path, step: int, position, elapsed_s: float, keep: int,
                     write_payload, extra_state: dict | None = None) -> Path:
    """Write checkpoints/step_N/ atomically: `write_payload(folder)` adds the weights, we add state.json.

    The folder is built under a temporary name and renamed into place; `latest` then points to
    it and checkpoints beyond the newest `keep` are removed. Shared by both backends.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    os.chmod(tmp, 0o777 & ~UMASK)
    try:
        write_payload(tmp)
        state = {"version": STATE_VERSION, **(extra_state or {}), "step": step, "elapsed_s": elapsed_s,
                 "position": {"epoch": position.epoch, "index": position.index}}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save(output_dir: Path, model, optimizer, step: int, position, elapsed_s: float, keep: int = 2) -> Path:
    """Write a complete MLX checkpoint for `step` and prune older ones beyond `keep`."""
    return save_state(output_dir, model.trainable_parameters(), optimizer.state, step, position, elapsed_s, keep)


def save_state(output_dir: Path, adapters: dict, optimizer_state: dict, step: int, position, elapsed_s: float,
               keep: int = 2) -> Path:
    """`save` from the parameter and optimizer-state trees themselves (e.g. ones kept from an earlier step)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    def write_payload(folder: Path) -> None:
        mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(adapters)))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))

    return write_checkpoint(output_dir, step, position, elapsed_s, keep, write_payload)


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(root.glob("step_*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def load_latest(output_dir: Path, model, optimizer) -> dict | None:
    """Restore adapters, optimizer state and RNG from the newest checkpoint; returns its state."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = latest(output_dir)
    if path is None:
        return None
    state = json.loads((path / "state.json").read_text())
    older = [p for p in sorted(checkpoint_root(output_dir).glob("step_*")) if p != path and (p / "state.json").is_file()]
    fix = (f"delete {path} to resume from {older[-1].name}" if older else "start again without --resume") + \
        ", or restore the file"
    adapters = load_safetensors(path / "adapters.safetensors", fix)
    expected = dict(tree_flatten(model.trainable_parameters()))
    mismatched = sorted(set(adapters) ^ set(expected)) + [
        k for k in adapters if k in expected and adapters[k].shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError(f"{path}: checkpoint does not match the model's adapters ({', '.join(mismatched[:5])}...); "
                         "resume with the same model and lora settings, or start a new output_dir")
    model.load_weights(list(adapters.items()), strict=False)
    opt_state = load_safetensors(path / "optimizer.safetensors", fix)
    optimizer.init(model.trainable_parameters())  # the right nested structure, then fill it in
    for key, value in opt_state.items():
        _assign(optimizer.state, key.split("."), value)
    mx.eval(model.parameters(), optimizer.state)
    return state


def _assign(tree, path: list[str], value) -> None:
    """Set tree[a][b]... = value for a dotted key whose parts index dicts or lists."""
    for part in path[:-1]:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    last = path[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def elapsed_of(output_dir: Path) -> float:
    path = latest(output_dir)
    if path is None:
        return 0.0
    return float(json.loads((path / "state.json").read_text()).get("elapsed_s", 0.0))
