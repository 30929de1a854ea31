"""Generate the DPO demo's preference set: the ISO date (chosen) against a wrong answer (rejected).

The prompts are the SFT demo's (`make_dates.make_records`, same seed). The rejected answer is
the date copied back unchanged from the prompt, which the untuned SmolLM2-135M-Instruct ranks above the correct ISO date for
most prompts (README: "Preference tuning"), so a short DPO run has something to flip.

    python -m mlx_lora.demo.make_date_pairs     # rewrites mlx_lora/demo/date_pairs/*.jsonl byte for byte
"""

from __future__ import annotations

import json
from pathlib import Path

from .make_dates import make_records

OUT_DIR = Path(__file__).with_name("date_pairs")
SPLITS = {"train": 400, "valid": 50, "test": 100}  # taken in order from the records


def make_pairs() -> dict[str, list[dict]]:
    """{split: rows} of `{"messages": [user prompt], "chosen": ISO date, "rejected": the date as given}`."""
    records = make_records()
    rows = []
    for record in records[: sum(SPLITS.values())]:
        prompt = f"{record['instruction']}\n\n{record['input']}"
        rows.append({"messages": [{"role": "user", "content": prompt}], "chosen": record["output"],
                     "rejected": record["input"]})  # echoed, not converted
    splits, start = {}, 0
    for name, size in SPLITS.items():
        splits[name] = rows[start: start + size]
        start += size
    return splits


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for name, rows in make_pairs().items():
        path = OUT_DIR / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
