"""A torchvision-style residual CNN (in-place ReLU, ``out += identity``): structured vs vmap engines.

The network: a 3x3 stem Conv2d(1->16) + BatchNorm + ReLU(inplace), two torchvision BasicBlocks
(16->16, 16->32 with a strided 1x1 downsample), global average pooling, Linear(32->10); trained
briefly on sklearn digits reshaped to (1, 8, 8).  Before issue 10 the in-place operations sent it
to ``vmap(jacrev)`` ("before" = ``method="vmap"``); the structured engine now handles them.

Timed (median of ``--repeats``, float32, one thread):

* exact trace NTK: ``TraceNTK(model, normalize=False).fit_transform(X)`` on ``--n`` digits;
* projected trace NTK: the same with ``projection_dim=512``;
* TRAK: ``TRAK(model, projection_dim=512).fit(X, y).attribute(X_test, y_test)``;

each with the structured engine (after), ``method="vmap"`` (before) and a naive ``torch.func``
implementation (per-example Jacobians by ``vmap(jacrev)`` in chunks, then a GEMM Gram, a
Gaussian projection, or TRAK's formula on projected margin gradients).

Memory (peak RSS of the projected fallback against the budget) is measured by
``bench_memory.py``.

Run ``python benchmarks/bench_resnet.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import add_common_args, load_digits_data, print_table, setup, time_call  # noqa: E402

from skattr import TorchModel  # noqa: E402
from skattr import gradients as G  # noqa: E402
from skattr.estimators import TRAK, TraceNTK  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--n", type=int, default=500, help="digits for the kernels and TRAK")
    p.add_argument("--k", type=int, default=512, help="projection dimension")
    return p.parse_args(argv)


def trained_model(X, y, epochs):
    torch.manual_seed(0)
    return TorchModel(ResNetDigits(), epochs=epochs, lr=0.05, batch_size=64,
                      random_state=0).fit(X, y)


# ------------------------------------------------------------------------------ naive torch.func
def naive_jacobians(net, X, fn=None, y=None, chunk=64):
    """Per-example Jacobians (n, m, p) by vmap(jacrev(functional_call)), in chunks."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def f(p, xi, yi):
        z = functional_call(net, ({**p, **buffers},), (xi[None],))
        return z[0] if fn is None else fn(z, yi[None])

    yy = torch.zeros(len(X), dtype=torch.long) if y is None else y
    out = []
    for i in range(0, len(X), chunk):
        J = vmap(jacrev(f), in_dims=(None, 0, 0))(params, X[i:i + chunk], yy[i:i + chunk])
        out.append(torch.cat([J[k].reshape(J[k].shape[0], J[k].shape[1], -1) for k in params], -1))
    return torch.cat(out)


def margin(z, y):
    zc = z.gather(1, y[:, None])[:, 0]
    return zc - torch.logsumexp(z.scatter(1, y[:, None], float("-inf")), 1)


def naive_trace(net, X):
    J = naive_jacobians(net, X).flatten(1)
    return J @ J.T


def naive_projected(net, X, k):
    J = naive_jacobians(net, X)
    P = torch.randn(J.shape[-1], k, generator=torch.Generator().manual_seed(0))
    Fp = J @ P / math.sqrt(k)
    return Fp.flatten(1) @ Fp.flatten(1).T


def naive_trak(net, X, y, Xt, yt, k, ridge=1.0):
    P = torch.randn(sum(p.numel() for p in net.parameters()), k,
                    generator=torch.Generator().manual_seed(0))
    Phi = naive_jacobians(net, X, margin, y)[:, 0] @ P / math.sqrt(k)
    g = naive_jacobians(net, Xt, margin, yt)[:, 0] @ P / math.sqrt(k)
    lam = ridge * (Phi**2).sum(1).mean()
    A = torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(k), Phi.T)
    with torch.no_grad():
        p = torch.softmax(net(X), 1)[torch.arange(len(y)), y]
    return g @ A * (1 - p)


# ------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.n, args.k, args.repeats = 64, 64, 1
    setup(args, "ResNet-style CNN with in-place ops: structured vs vmap engines")
    X, y = load_digits_data()
    X = X.reshape(-1, 1, 8, 8)
    model = trained_model(X, y, args.epochs)
    net = model.network()
    print(f"parameters: {sum(p.numel() for p in net.parameters()):,}; n = {args.n}; k = {args.k}")
    info = {}
    G.compute_records(net, torch.as_tensor(X[:4]), info=info)
    print(f"auto engine: {info['engine']} ({info['reason']})")
    Xs, ys = X[: args.n], y[: args.n]
    Xq, yq = X[-50:], y[-50:]
    Xst = torch.as_tensor(Xs)
    rows = []

    def bench(name, after, before, naive):
        t_a, _, ra = time_call(after, args.repeats)
        t_b, _, rb = time_call(before, args.repeats)
        t_n, _, _ = time_call(naive, max(1, args.repeats // 2))
        err = float(np.abs(ra - rb).max() / np.abs(rb).max())
        rows.append([name, f"{t_a:.3f}", f"{t_b:.3f}", f"{t_n:.3f}", f"{t_b / t_a:.1f}x",
                     f"{t_n / t_a:.1f}x", f"{err:.1e}"])

    bench("exact trace NTK",
          lambda: TraceNTK(model, normalize=False).fit_transform(Xs),
          lambda: TraceNTK(model, normalize=False, method="vmap").fit_transform(Xs),
          lambda: naive_trace(net, Xst))
    bench(f"projected trace NTK (k={args.k})",
          lambda: TraceNTK(model, normalize=False, projection_dim=args.k).fit_transform(Xs),
          lambda: TraceNTK(model, normalize=False, projection_dim=args.k,
                           method="vmap").fit_transform(Xs),
          lambda: naive_projected(net, Xst, args.k))
    bench(f"TRAK fit + attribute (k={args.k})",
          lambda: TRAK(model, projection_dim=args.k).fit(Xs, ys).attribute(Xq, yq),
          lambda: TRAK(model, projection_dim=args.k, method="vmap").fit(Xs, ys).attribute(Xq, yq),
          lambda: naive_trak(net, Xst, torch.as_tensor(ys), torch.as_tensor(Xq),
                             torch.as_tensor(yq), args.k))
    print_table(rows, ["task", "structured s", "vmap s", "naive s", "vmap/structured",
                       "naive/structured", "max rel diff vs vmap"])
    print("(projected rows: the two engines draw different, equally valid projections, so their "
          "difference is projection noise, not an error)")



if __name__ == "__main__":
    main()
