"""The `mlx-lora` command: train, plan, eval, prepare, fuse, serve, convert-adapter, doctor.

Process-wide settings are made here and only here: the BLAS preload (by re-executing once
with LD_PRELOAD on Linux), MLX's memory limit for training, and the turning of library
exceptions into one-line errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

STARTED_ENV = "MLX_LORA_STARTED_AT"  # set by train_by_mlx.sh: when the user's command began (epoch seconds)
REPO_DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# Subcommands implemented by other modules, each exposing main(argv) -> int.
DELEGATES = {
    "prepare": ("mlx_lora.prepare.cli", "convert raw data to train/valid/test JSONL (same as data_transform.py)"),
    "fuse": ("mlx_lora.fuse", "merge adapters into the base and write a Hugging Face folder"),
    "serve": ("mlx_lora.serve.cli", "OpenAI-compatible server for a base model and its adapters"),
    "convert-adapter": ("mlx_lora.adapters.peft_format", "convert adapters between the MLX and PEFT formats"),
}


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _default_config() -> str:
    if REPO_DEMO_CONFIG.is_file():
        return str(REPO_DEMO_CONFIG)
    raise FileNotFoundError("no config given and configs/demo.yaml is not next to the package; pass CONFIG.yaml")


def cmd_train(args) -> int:
    from .config import load_config

    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(path or _default_config(), overrides)
    if args.resume:  # the run continues with its own recorded settings (train_config.yaml)
        from .config import resumed_config

        resumed, differences = resumed_config(cfg, overrides)
        # Settings the file changed since the run started; an `auto` each rank resolves again as it did then.
        kept = [line for line in differences if "(from the command line)" not in line and "what 'auto' chose" not in line]
        if kept and (args.hosts or (args.processes or 1) > 1):
            raise ValueError("--resume with several ranks: the config differs from the run's recorded settings ("
                             + "; ".join(line.removeprefix("resume: ") for line in kept) + "); pass those keys on "
                             "the command line so every rank gets them")
        for line in differences:
            print(line, flush=True)
        cfg = resumed
    if args.hosts or (args.processes or 1) > 1:
        return launch_ranks(cfg, [path or _default_config(), *overrides], args)
    if cfg.backend == "cuda":
        from .backends.cuda import run_training as run_cuda

        if cfg.training.batch_size == "auto":
            raise ValueError("training.batch_size: auto is planned for the MLX backend only; give a number for backend: cuda")

        run_cuda(cfg, resume=args.resume)
        return 0
    from .cpu_streams import prepare_process
    from .memory.plan import guard_limit
    from .run import run_training

    prepare_process(cfg.training)  # before MLX's first evaluation

    limit = guard_limit(cfg.training.memory_limit)
    if limit is not None:  # MLX's allocator works to stay under it; train() stops a step that passed it
        import mlx.core as mx

        mx.set_memory_limit(int(limit))
        if mx.metal.is_available():  # keep the weights resident rather than paged out between steps
            mx.set_wired_limit(int(min(limit, mx.metal.device_info()["max_recommended_working_set_size"])))
    run_training(cfg, resume=args.resume, setup_s=_setup_seconds(), memory_limit=limit)
    return 0


def launch_ranks(cfg, items: list[str], args) -> int:
    """Check the hosts and the batch, then become `mlx.launch`, which runs `mlx-lora train` once per rank."""
    import signal

    from .distributed import check_batch_size
    from .launch import check_reachable, launch_command, read_hosts, run_launcher

    if cfg.backend != "mlx":
        raise ValueError(f"--hosts / -n start MLX ranks; with backend: {cfg.backend} use "
                         "`accelerate launch --num_processes N -m mlx_lora train CONFIG` (see the README)")
    if args.hosts:
        hosts = read_hosts(args.hosts, cfg.distributed.backend)
        if len(hosts) == 1:
            raise ValueError(f"{args.hosts}: lists one host; data parallel needs two or more (or train without --hosts)")
        check_reachable(hosts, args.hosts)
        size = len(hosts)
    else:
        size = args.processes
    if cfg.training.batch_size == "auto":
        raise ValueError("training.batch_size: auto is planned per machine; with several ranks set the global "
                         f"batch as a number divisible by {size}")
    check_batch_size(cfg.training.batch_size, size)
    command = launch_command(["train", *items, *(["--resume"] if args.resume else [])], args.processes,
                             args.hosts, cfg.distributed.backend)
    print(f"==> {size} ranks: {' '.join(command)}", file=sys.stderr, flush=True)
    # Ctrl-C goes to every rank (same terminal), and each stops at a step boundary with a
    # checkpoint; the launcher ignores it, so it keeps relaying their output until they are done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run_launcher(command)


PLAN_DOES_NOT_FIT = 3  # plan's exit status when the run would not fit: `mlx-lora plan my.yaml && ./train_by_mlx.sh my.yaml`


def cmd_plan(args) -> int:
    import json

    from .config import load_config
    from .memory.plan import mac_ram, mac_working_set, make_plan, parse_memory

    memory = parse_memory(args.memory) if args.memory is not None else None
    if args.mac and memory is None and sys.platform != "darwin":
        raise ValueError("--mac plans for a Mac of the size --memory gives (its RAM, e.g. --memory 32GB); add it")
    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(path or _default_config(), overrides, need_data=False)
    source = f"--memory {args.memory}" if memory else None
    if memory and args.mac:  # a Mac of that much RAM: its GPU may keep only part of it resident
        ram, memory = mac_ram(memory), mac_working_set(mac_ram(memory))
        source = (f"the GPU working set of a {ram / 2**30:.3g} GB Mac, {memory / ram:.0%} of its RAM: "
                  f"--memory {args.memory} --mac")
    if memory is None:  # a training.memory_limit below this machine's memory is what the run may use
        from .run import planned_memory

        memory, source = planned_memory(cfg)
    plan = make_plan(cfg, memory, source, dequantize_path=False if args.mac else None)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else PLAN_DOES_NOT_FIT


def _setup_seconds() -> float | None:
    """Seconds since the shell script started (it exports MLX_LORA_STARTED_AT, epoch seconds)."""
    import time

    started = os.environ.get(STARTED_ENV)
    try:
        return max(0.0, time.time() - float(started)) if started else None
    except ValueError:
        return None


def cmd_eval(args) -> int:
    from .adapters import load_adapters
    from .config import load_config, run_differences
    from .kernel_cache import start_preamble_pch
    from .preference_data import load_datasets_for
    from .run import load_base, run_eval

    path, overrides = _split_config_and_overrides(args.items)
    if path is None and args.adapter and (Path(args.adapter) / "train_config.yaml").is_file():
        path = str(Path(args.adapter) / "train_config.yaml")  # --adapter RUN alone: the run's own settings
    cfg = load_config(path or _default_config(), overrides)
    start_preamble_pch()  # in the background: MLX's CPU kernels build faster once it is there
    adapter_dir = Path(args.adapter or cfg.output_dir)
    model, tokenizer, _, _ = load_base(cfg)  # the base quantized as it was for training
    load_adapters(model, adapter_dir)
    datasets, _ = load_datasets_for(cfg.data, tokenizer, cfg.training.objective, splits=("test",))
    if cfg.training.batch_size == "auto":  # the batch the training run chose, recorded in its folder
        import dataclasses

        import yaml

        recorded = adapter_dir / "train_config.yaml"
        batch = yaml.safe_load(recorded.read_text())["training"]["batch_size"] if recorded.is_file() else 1
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=int(batch)))
    differences = run_differences(cfg, adapter_dir)
    name = "eval.json"
    if differences:  # scoring another way than the run trained: its own scores stay where they are
        name = f"eval_{Path(path).stem if path else 'other'}.json"
        print(f"warning: the adapters in {adapter_dir} were trained otherwise ({'; '.join(differences)}); scored as "
              f"the config says, into {name} (the run's eval.json is kept; pass {adapter_dir / 'train_config.yaml'} "
              "to score them as trained)", file=sys.stderr, flush=True)
    scores = run_eval(model, tokenizer, datasets["test"], cfg, adapter_dir, name)
    summary_file = adapter_dir / "run_summary.json"
    if differences:
        print(f"wrote {adapter_dir / name}")
        return 0
    if summary_file.is_file():  # keep the run's summary in step with the eval.json just written
        import json

        from .checkpoints import write_json

        summary = json.loads(summary_file.read_text())
        write_json(summary_file, {**summary, "eval": scores})
    print(f"wrote {adapter_dir / 'eval.json'}" + (" (and run_summary.json's eval)" if summary_file.is_file() else ""))
    return 0


def cmd_doctor(args) -> int:
    import platform

    import mlx.core as mx

    from . import __version__
    from .blas import CORETYPE_ENV, INSTALL_HINT, find_fast_blas, loaded_blas_libraries, matmul_gflops, openblas_corename

    def version(name):
        try:
            return importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - reporting only
            return "not installed"

    print(f"mlx-lora      {__version__}")
    print(f"python        {sys.version.split()[0]} ({platform.platform()})")
    for name in ("mlx", "mlx_lm", "transformers", "numpy"):
        print(f"{name:13s} {version(name) if name != 'mlx' else mx.__version__}")
    print(f"device        {mx.default_device()}")
    if mx.metal.is_available():
        info = mx.metal.device_info()
        print(f"metal         {info.get('device_name', '?')}, recommended working set "
              f"{info.get('max_recommended_working_set_size', 0) / 1e9:.1f} GB")
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        print(f"memory        {pages * page_size / 2**30:.1f} GiB")
    except (ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        loaded = loaded_blas_libraries()
        print(f"blas loaded   {', '.join(loaded) or 'none found in /proc/self/maps'}")
        print(f"fast blas     {find_fast_blas() or 'none: ' + INSTALL_HINT}")
        if os.environ.get(CORETYPE_ENV):
            print(f"openblas core {os.environ[CORETYPE_ENV]} ({CORETYPE_ENV}; the library's own pick on this CPU: "
                  f"{openblas_corename(find_fast_blas() or '') or 'unknown'})")
        if mx.default_device() == mx.cpu:
            from .kernel_cache import DISABLE_ENV, kernel_cache_dir, preamble_pch_path

            gxx = shutil.which("g++")
            pch = preamble_pch_path()
            state = ("off (" + DISABLE_ENV + ")" if os.environ.get(DISABLE_ENV) else
                     "present" if pch.exists() else "not built yet (the next train / eval / serve builds it)")
            print(f"kernels       {kernel_cache_dir()}: {len(list(kernel_cache_dir().glob('*.so')))} built; "
                  + (f"g++ {gxx}, precompiled preamble {state}" if gxx else
                     "no g++ on PATH: MLX runs compiled graphs unfused, slower (install g++)"))
            from .serve.panel_kernel import load as load_panel_kernel

            print(f"decode kernel {load_panel_kernel().note}")
    print(f"matmul        {matmul_gflops():.0f} GFLOP/s (float32 1024x1024 on {mx.default_device()})")
    if args.hosts:
        return doctor_hosts(args)
    return 0


def doctor_hosts(args) -> int:
    """Reachability over ssh, then one `launch check` rank per host: the ring connects, inputs agree."""
    import subprocess

    from .config import load_config
    from .launch import check_reachable, launch_command, read_hosts

    path, overrides = _split_config_and_overrides(args.items)
    path = path or _default_config()
    cfg = load_config(path, overrides)
    hosts = read_hosts(args.hosts, cfg.distributed.backend)
    check_reachable(hosts, args.hosts)
    print(f"hosts         {len(hosts)} reachable: {', '.join(h.ssh for h in hosts)}")
    command = launch_command([], None, args.hosts, cfg.distributed.backend)
    command = command[: command.index("-m") + 1] + ["mlx_lora.launch", "check", path, *overrides]
    limit = cfg.distributed.timeout_s
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{args.hosts}: the ranks did not connect within {limit:g}s (distributed.timeout_s); "
                           "check each host's \"ips\" (reachable from the others, same subnet) and the firewall") from err
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    verdict = [line for line in lines if line.startswith(("ring ok", "error:"))] or lines[-1:]
    print(f"ring          {verdict[0] if verdict else f'mlx.launch exited with {done.returncode}'}")
    return 0 if done.returncode == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from .config import describe

    settings = "\n".join(f"  {key:32s} {default:>12s}  {help_}" for key, default, help_ in describe())
    parser = argparse.ArgumentParser(prog="mlx-lora", description="LoRA / QLoRA fine-tuning on MLX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train adapters from a YAML config",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="settings (YAML keys, or key.path=value overrides):\n" + settings)
    train.add_argument("items", nargs="*", metavar="CONFIG.yaml [key.path=value ...]",
                       help="config file (default: configs/demo.yaml) then overrides")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--hosts", metavar="HOSTS.json",
                       help="data-parallel over the Macs in this mlx.launch hosts file (distributed.backend picks the engine)")
    train.add_argument("-n", "--processes", type=int, metavar="N",
                       help="data-parallel over N local processes (mlx.launch -n N)")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="score a trained run on its test split (base vs tuned)",
                              description="Score base and tuned on the test split and write eval.json into the run. "
                                          "Pass the run's CONFIG (or runs/X/train_config.yaml), or --adapter RUN alone "
                                          "to use the run's own recorded settings.")
    evaluate.add_argument("items", nargs="*", metavar="CONFIG.yaml [key.path=value ...]")
    evaluate.add_argument("--adapter", help="adapter folder (default: the config's output_dir)")
    evaluate.set_defaults(func=cmd_eval)
    plan = sub.add_parser("plan", help="predict a training step's peak memory and whether it fits (reads config.json only)",
                          epilog=f"exit status: 0 fits, {PLAN_DOES_NOT_FIT} does not fit, 1 an error in the config or model")
    plan.add_argument("items", nargs="*", metavar="CONFIG.yaml [key.path=value ...]",
                      help="the run's config (default: configs/demo.yaml) and overrides; data.path may be left out")
    plan.add_argument("--memory", help="memory to fit in: 16GB, 32GB, 64GB, ... (default: this machine's; "
                                       "on a Mac the GPU working set)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (peak_gb, fits, components, ...)")
    plan.add_argument("--mac", action="store_true", help="plan the Apple GPU path (fused 4-bit products, checkpoint-dtype "
                                                        "activations) from any machine")
    plan.set_defaults(func=cmd_plan)
    doctor = sub.add_parser("doctor", help="print device, versions, BLAS and memory")
    doctor.add_argument("--hosts", metavar="HOSTS.json",
                        help="also check that every host is reachable, joins the ring and has the same kit, model and data")
    doctor.add_argument("items", nargs="*", metavar="CONFIG.yaml [key.path=value ...]",
                        help="with --hosts: the run's config (default: configs/demo.yaml)")
    doctor.set_defaults(func=cmd_doctor)
    for name, (module, help_) in DELEGATES.items():
        delegate = sub.add_parser(name, help=help_, add_help=False)
        delegate.add_argument("rest", nargs=argparse.REMAINDER)
        delegate.set_defaults(delegate=module)
    return parser


def _reexec_with_fast_blas(argv: list[str]) -> None:
    from .blas import preload_command_env

    env = preload_command_env()
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "mlx_lora", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "doctor", "fuse", "serve"):
        _reexec_with_fast_blas(argv)
    parser = build_parser()
    if argv and argv[0] in DELEGATES:
        module = DELEGATES[argv[0]][0]
        try:
            delegate_main = importlib.import_module(module).main
        except ModuleNotFoundError as err:
            print(f"error: `mlx-lora {argv[0]}` is unavailable: {err}", file=sys.stderr)
            return 1
        import inspect

        if "prog" in inspect.signature(delegate_main).parameters:
            return delegate_main(argv[1:], prog=f"mlx-lora {argv[0]}")
        return delegate_main(argv[1:])
    # `train CONFIG -n 2 key=value`: positionals after an option come back as extras; they are items.
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "items") and not any(e.startswith("-") for e in extras):
        args.items += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """Run a subcommand, turning user mistakes into one-line errors (no traceback)."""
    from .config import ConfigError

    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        if os.environ.get("MLX_LORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
