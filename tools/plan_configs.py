"""Write the memory planner's figure for a 32 GB Mac into each configs/models/*.yaml, as a comment.

    python tools/plan_configs.py            # rewrite the comment line in every ready config
    python tools/plan_configs.py --check    # exit 1 if any comment is missing or stale

Each config's shape comes from the hf_config/*.json its header names (no download). The plan is
the Mac GPU path (bfloat16 activations, no dequantized copies) against a 32 GB Mac's GPU working set,
as `mlx-lora plan CONFIG --memory 32GB --mac` plans it; the line starts with MARKER and is replaced in place.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lora.checkpoints import write_text  # noqa: E402

MARKER = "# Memory (tools/plan_configs.py):"


def figure(config_path: Path) -> str:
    from mlx_lora.config import load_config
    from mlx_lora.memory.plan import mac_ram, mac_working_set, make_plan, parse_memory

    named = re.search(r"hf_config/(\S+\.json)", config_path.read_text())  # the config's own comment names it
    shape_file = config_path.parent / "hf_config" / (named.group(1) if named else f"{config_path.stem}.json")
    if not shape_file.is_file():
        raise FileNotFoundError(f"{config_path}: no {shape_file} to size the model from")
    cfg = load_config(config_path, [f"model={shape_file}"])
    plan = make_plan(cfg, mac_working_set(mac_ram(parse_memory("32GB"))), "a 32 GB Mac's GPU working set", dequantize_path=False)
    s = plan.settings
    verdict = "fits" if plan.fits else "does NOT fit"
    return (f"{MARKER} predicted peak {plan.peak / 1e9:.1f} GB on a 32 GB Mac ({verdict}; batch {s.batch_size} x "
            f"{s.seq_length} tokens, grad checkpoint {'on' if s.grad_checkpoint else 'off'}); "
            f"breakdown: mlx-lora plan {config_path.relative_to(ROOT)} model={shape_file.relative_to(ROOT)} --memory 32GB --mac")


def updated(text: str, line: str) -> str:
    lines = [row for row in text.splitlines() if not row.startswith(MARKER)]
    header = next((i for i, row in enumerate(lines) if not row.startswith("#")), len(lines))
    return "\n".join(lines[:header] + [line] + lines[header:]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that every comment is present and current")
    parser.add_argument("--dir", type=Path, default=ROOT / "configs" / "models")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(args.dir.glob("*.yaml")):
        text = path.read_text()
        new = updated(text, figure(path))
        if new != text:
            stale.append(path)
            if not args.check:
                write_text(path, new)  # atomic: a config is never half-written
        print(f"{'stale' if args.check and new != text else 'ok   '} {path.name}: {figure(path)[len(MARKER):].strip()}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
