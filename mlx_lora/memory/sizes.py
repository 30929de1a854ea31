"""Memory sizes as users write them ('32GB', '24GiB', '512MB'), for settings and the command line.

Apart from `plan.py` so that `config.py` can check a size without importing the planner (which
itself builds configs for its suggestions).
"""

from __future__ import annotations

import re

GB = 1e9
MEMORY_FORMS = "a size such as 16GB, 32GB, 64GB, 24GiB or 512MB"
_UNITS = {"": GB, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": GB, "gb": GB, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> float:
    """'32GB', '24 GiB', '512MB', '16' (GB) -> bytes. ValueError with the accepted forms otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory size {text!r} is not understood; expected {MEMORY_FORMS}")
    return float(match.group(1)) * _UNITS[unit]
