"""Range checks of the entry scripts' flags (train.py's and eval.py's `Args`): one line for the
first flag out of range, before anything is loaded or written."""

import math

RULES = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0,
         "finite >= 0": lambda v: math.isfinite(v) and v >= 0,
         "finite > 0": lambda v: math.isfinite(v) and v > 0}


def check_flags(prog: str, values: dict, rules: dict[str, tuple[str, ...]]) -> None:
    """Exit with one line at the first flag that breaks its rule (a key of RULES; NaN breaks
    every rule). An unset flag (None) passes; a tuple's every element must pass."""
    for rule, names in rules.items():
        for name in names:
            value = values[name]
            if value is None:
                continue
            if not all(RULES[rule](v) for v in (value if isinstance(value, tuple) else (value,))):
                raise SystemExit(f"{prog}: error: --{name.replace('_', '-')} must be "
                                 f"{rule.replace('finite', 'a finite number')}, got {value}")
