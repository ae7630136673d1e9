"""The memory planner shared by every gradient engine: chunk sizes from a byte budget.

The budget is, in order: an explicit ``budget=`` argument, the environment variable
``SKATTR_MEMORY_BUDGET`` (bytes, or a number with a unit: ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``),
or :data:`DEFAULT_BUDGET`.  It bounds what one call allocates on the module's device: the
records it returns and its working memory (activations, per-output gradients, Jacobians).
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_BUDGET", "ENV_VAR", "memory_budget", "parse_bytes", "plan_chunk"]

DEFAULT_BUDGET = 2**30  # 1 GiB
ENV_VAR = "SKATTR_MEMORY_BUDGET"

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value):
    """A byte count from an int or a string such as ``"512MiB"``; ``ValueError`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"Cannot read a byte count from {value!r} (e.g. 1073741824, '1GiB').")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0:
        raise ValueError(f"A memory budget must be positive, got {value!r}.")
    return int(n)


def memory_budget(budget=None):
    """The budget in bytes: ``budget`` if given, else ``$SKATTR_MEMORY_BUDGET``, else
    :data:`DEFAULT_BUDGET`."""
    if budget is not None:
        return parse_bytes(budget)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return parse_bytes(env)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}={env!r}: {exc}") from None
    return int(DEFAULT_BUDGET)


def plan_chunk(n, per_example, budget, *, fixed=0, what="this computation"):
    """Largest chunk ``c <= n`` with ``fixed + c * per_example <= budget``.

    Raises ``MemoryError`` when even one example does not fit.
    """
    per_example = max(int(per_example), 1)
    room = budget - int(fixed)
    if room < per_example:
        raise MemoryError(
            f"{what} needs about {(fixed + per_example) / 2**20:.1f} MiB for one example, more "
            f"than the memory budget of {budget / 2**20:.1f} MiB. Raise the budget (budget=..., "
            f"or the environment variable {ENV_VAR}), or select fewer parameters."
        )
    return int(max(1, min(n, room // per_example)))
