"""Shared helpers for the skattr speed benchmarks: data, models, timing, tables.

Every benchmark runs skattr and its reference (a peer library or a naive ``torch.func``
implementation) on the same model, data and settings in *one* process, so the ratios it prints
are measured under the same load.  Timings use :func:`time.perf_counter` after an untimed
warm-up call and report the median of a few repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

__all__ = [
    "add_common_args",
    "setup",
    "load_digits_data",
    "make_mlp",
    "make_cnn",
    "train",
    "n_params",
    "time_call",
    "fwd_bwd_throughput",
    "gram_errors",
    "print_table",
    "fmt",
]


# ------------------------------------------------------------------------------ environment
def proc_status(field: str) -> int:
    """A byte count of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 0 keeps torch's default (default: 1, "
                             "which gives stable ratios on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per measurement (median reported)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="training epochs of the benchmark network")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run of a few seconds")
    return parser


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def setup(args, title: str) -> torch.device:
    """Set threads, print the environment header; returns the device."""
    if args.threads:
        torch.set_num_threads(int(args.threads))
    device = torch.device("cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"== {title} ==")
    print(f"python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | device {device} | "
          f"cpu {_cpu_name()} x{os.cpu_count()} | load avg {load[0]:.2f}")
    print(f"argv: {' '.join(sys.argv[1:]) or '(defaults)'}")
    return device


# ------------------------------------------------------------------------------ data / models
def load_digits_data():
    """sklearn digits: X (1797, 64) float32 in [0, 1], y (1797,) int64."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def make_mlp(seed: int = 0) -> nn.Module:
    """MLP 64-256-256-10 (85,002 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


class _Img(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 1, 8, 8)


def make_cnn(seed: int = 0) -> nn.Module:
    """Small CNN on 8x8 digits: Conv2d 1->16->32 (3x3, padding 1) + Linear 2048->10 (25,290 params)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        _Img(),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def train(module: nn.Module, X, y, epochs: int = 5):
    """A briefly trained ``skattr.TorchModel`` (seeded SGD, random_state=0) and its accuracy."""
    from skattr import TorchModel

    model = TorchModel(module, epochs=int(epochs), batch_size=64, lr=0.05, momentum=0.9,
                       device="cpu", random_state=0).fit(X, y)
    return model, float(model.score(X, y))


# ------------------------------------------------------------------------------ timing
def time_call(fn, repeats: int = 3, warmup: int = 1):
    """(median seconds, list of seconds, last result) of ``fn()`` after ``warmup`` untimed calls."""
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def fwd_bwd_throughput(module: nn.Module, X, y, batch_size: int = 256, repeats: int = 3):
    """Samples/s of plain batched training forward + backward (mean cross-entropy) over X.

    One untimed warm-up pass; the median over ``repeats`` passes over all of X in batches.
    Gradients are zeroed (set to None) between batches, as an optimizer step would.
    """
    net = module.train()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    batches = [(Xt[i:i + batch_size], yt[i:i + batch_size]) for i in range(0, len(Xt), batch_size)]
    loss_fn = nn.CrossEntropyLoss()

    def run():
        for xb, yb in batches:
            for p in net.parameters():
                p.grad = None
            loss_fn(net(xb), yb).backward()

    sec, _, _ = time_call(run, repeats=repeats)
    for p in net.parameters():
        p.grad = None
    net.eval()
    return len(Xt) / sec, sec


# ------------------------------------------------------------------------------ accuracy
def gram_errors(F, K_exact):
    """(correlation, relative Frobenius error) of ``F @ F.T`` against ``K_exact``.

    Correlation: Pearson over the upper triangle (diagonal included) of the two Gram matrices.
    Relative Frobenius error: ``|F F^T - K|_F / |K|_F``.
    """
    F = np.asarray(F, dtype=np.float64).reshape(len(F), -1)
    K = np.asarray(K_exact, dtype=np.float64)
    Kp = F @ F.T
    iu = np.triu_indices(K.shape[0])
    corr = float(np.corrcoef(Kp[iu], K[iu])[0, 1])
    rel = float(np.linalg.norm(Kp - K) / np.linalg.norm(K))
    return corr, rel


# ------------------------------------------------------------------------------ output
def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    v = float(v)
    if not np.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1e-3:
        return f"{v:.{nd}g}" if a < 1 else f"{v:.{nd}g}"
    return f"{v:.2e}"


def print_table(rows, headers, title=None):
    """Print a GitHub-markdown table (so it can be pasted into the README as is)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()
