"""The memory planner shared by every gradient engine: chunk sizes from a byte budget.

The budget is, in order: an explicit ``budget=`` argument, the environment variable
``SKATTR_MEMORY_BUDGET`` (bytes, or a number with a unit: ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``),
or :data:`DEFAULT_BUDGET`.  It bounds what one call allocates on the module's device: the
records it returns and its working memory (activations, per-output gradients, Jacobians).
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_BUDGET", "ENV_VAR", "SLACK", "memory_budget", "parse_bytes", "plan_chunk",
           "usable"]

DEFAULT_BUDGET = 2**30  # 1 GiB
ENV_VAR = "SKATTR_MEMORY_BUDGET"
# Share of the budget left to the allocator: freed blocks it keeps for reuse (glibc does not
# return them at once) and estimates' rounding; benchmarks/bench_memory.py measures it.
SLACK = 0.125

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


def usable(budget):
    """The part of ``budget`` that plans may fill: all but the allocator's :data:`SLACK`."""
    return int(budget * (1 - SLACK))


def plan_chunk(n, per_example, budget, *, fixed=0, what="this computation"):
    """Largest chunk ``c <= n`` with ``fixed + c * per_example <= usable(budget)``.

    ``fixed`` counts what is held whatever the chunk size (the engine's fixed memory, the
    caller's output rows, a projection's rows).  Raises ``MemoryError`` when even one example
    does not fit.

    Examples
    --------
    >>> from skattr._memory import plan_chunk, usable
    >>> c = plan_chunk(1000, per_example=2**20, budget=2**30, fixed=2**28)
    >>> c, 2**28 + c * 2**20 <= usable(2**30)
    (640, True)
    """
    per_example = max(int(per_example), 1)
    room = usable(budget) - int(fixed)
    if room < per_example:
        raise MemoryError(
            f"{what} needs about {(fixed + per_example) / 2**20:.1f} MiB for one example "
            f"({fixed / 2**20:.1f} MiB of it held whatever the chunk size), more than "
            f"{usable(budget) / 2**20:.1f} MiB of the memory budget of {budget / 2**20:.1f} MiB "
            f"(the rest is left to the allocator). Raise the budget (budget=..., or the "
            f"environment variable {ENV_VAR}), or select fewer parameters."
        )
    return int(max(1, min(n, room // per_example)))
