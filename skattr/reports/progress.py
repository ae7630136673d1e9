"""Step-by-step progress of the main job: one line per step, naming it, with the run's position.

Every section declares its steps before the run starts (``n_steps(size)``), so the line can say
``step i of N`` for the whole run, not per section.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _clock(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class Progress:
    """Prints ``[skattr] step i/N  m:ss  section: what`` as each step starts.

    Parameters
    ----------
    total : int
        Steps of the whole run.
    quiet : bool, default=False
        Print nothing.
    stream : file, default=sys.stdout

    Examples
    --------
    >>> import io
    >>> buf = io.StringIO()
    >>> p = Progress(2, stream=buf)
    >>> p.step("ntk", "train the MLP")
    >>> p.step("ntk", "surrogates")
    >>> p.done_steps
    2
    >>> buf.getvalue().splitlines()[1].split()[:3]
    ['[skattr]', 'step', '2/2']
    """

    def __init__(self, total, *, quiet=False, stream=None):
        self.total = int(total)
        self.quiet = quiet
        self.stream = stream
        self.done_steps = 0
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def step(self, section, what):
        """Announce the next step."""
        self.done_steps += 1
        if self.quiet:
            return
        out = self.stream if self.stream is not None else sys.stdout
        width = len(str(self.total))
        print(f"[skattr] step {self.done_steps:>{width}}/{self.total}  {_clock(self.elapsed())}  "
              f"{section}: {what}", file=out, flush=True)

    def message(self, text):
        """A line outside the step count (start and end of the run)."""
        if not self.quiet:
            out = self.stream if self.stream is not None else sys.stdout
            print(f"[skattr] {text}", file=out, flush=True)


class _NoProgress(Progress):
    def __init__(self):
        super().__init__(0, quiet=True)


def ensure(progress):
    """``progress`` or a silent one (section functions called directly)."""
    return progress if progress is not None else _NoProgress()
