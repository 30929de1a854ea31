"""Generate the demo's raw dataset: US-style dates to rewrite as ISO 8601 (Alpaca records).

Run `python -m mlx_lora.demo.make_dates` to rebuild `dates_raw.jsonl` byte for byte; the
train/valid/test splits are then made from it by `data_transform.py` (see the README).
"""

import calendar
import datetime
import json
import random
from pathlib import Path

RAW_PATH = Path(__file__).with_name("dates_raw.jsonl")
NUM_EXAMPLES = 1000
SEED = 20210307

INSTRUCTIONS = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD).",
    "Rewrite the date as YYYY-MM-DD.",
    "What is this date in ISO format? Answer with the date only.",
    "Normalize the following date to ISO 8601.",
    "Give the ISO 8601 form of this date.",
    "Turn this US-style date into YYYY-MM-DD.",
    "Express the date below in the format YYYY-MM-DD.",
    "Please reformat this date as an ISO date.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _render(date: datetime.date, style: int) -> str:
    month = calendar.month_name[date.month]
    mon = calendar.month_abbr[date.month]
    weekday = calendar.day_name[date.weekday()]
    styles = [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {mon} {date.year}",
        f"{mon} {date.day} {date.year}",
        f"{date.month}/{date.day}/{date.year}",
        f"{date.month:02d}/{date.day:02d}/{date.year}",
        f"{month} {_ordinal(date.day)}, {date.year}",
        f"the {_ordinal(date.day)} of {month}, {date.year}",
        f"{weekday}, {month} {date.day}, {date.year}",
        f"{mon}. {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
    ]
    return styles[style % len(styles)]


def make_records(num_examples: int = NUM_EXAMPLES, seed: int = SEED) -> list[dict]:
    """Return `num_examples` distinct Alpaca records (instruction, input, output)."""
    rng = random.Random(seed)
    start = datetime.date(1950, 1, 1).toordinal()
    end = datetime.date(2049, 12, 31).toordinal()
    records, seen = [], set()
    while len(records) < num_examples:
        date = datetime.date.fromordinal(rng.randint(start, end))
        text = _render(date, rng.randrange(10))
        if text in seen:
            continue
        seen.add(text)
        records.append(
            {"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": date.isoformat()}
        )
    return records


def main() -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records())
    tmp = RAW_PATH.with_suffix(".tmp")
    tmp.write_text(lines, encoding="utf-8")
    tmp.replace(RAW_PATH)
    print(f"wrote {NUM_EXAMPLES} records to {RAW_PATH}")


if __name__ == "__main__":
    main()
