"""Shared fixtures and independent references for the skattr test suite.

The references here deliberately avoid ``skattr.gradients``: per-example Jacobians come from
``torch.func.jacrev`` over ``torch.func.functional_call`` one example at a time, and kernels are
assembled from those dense Jacobians with plain ``einsum``.
"""

from __future__ import annotations

import os

# Dask's nanny starts its workers with OMP_NUM_THREADS=1 (distributed's pre-spawn-environ); the
# test process runs the same way, so float32 products agree bit for bit between the two. With
# an OpenMP runtime of 2 threads capped to 1 by torch.set_num_threads, BLAS took another path
# for a ragged row panel (1.3e-8 apart on TRAK scores, tests/test_dask.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


# ----------------------------------------------------------------------------- models
def make_mlp(d_in=5, hidden=7, n_out=3, dtype=torch.float64, seed=0):
    """A random MLP with biases."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, n_out),
    )
    return net.to(dtype)


def make_cnn(n_out=3, dtype=torch.float64, seed=0):
    """A random CNN on (n, 2, 6, 6) inputs: strided/padded Conv2d, BatchNorm2d (eval, non-trivial
    running statistics and affine parameters), LayerNorm and Linear layers, all with biases."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),  # -> (4, 3, 3)
        bn,
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, stride=1, padding=1),  # -> (3, 4, 4)
        nn.Tanh(),
        nn.Flatten(),
        nn.LayerNorm(48),
        nn.Linear(48, n_out),
    )
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4) * 0.5)
        bn.running_var.copy_(torch.rand(4) * 2 + 0.3)
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
        ln = net[6]
        ln.weight.copy_(torch.randn(48))
        ln.bias.copy_(torch.randn(48) * 0.1)
    return net.to(dtype).eval()


class SeqNet(nn.Module):
    """A Linear applied at several positions (n, L, d) followed by a LayerNorm over features."""

    def __init__(self, L=4, d=3, h=5, n_out=3):
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(L * h, n_out)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).flatten(1))


def make_seq(n_out=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = SeqNet(n_out=n_out)
    with torch.no_grad():
        net.norm.weight.copy_(torch.randn(5))
        net.norm.bias.copy_(torch.randn(5))
    return net.to(dtype).eval()


def input_for(kind, n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (5,), "cnn": (2, 6, 6), "seq": (4, 3)}[kind]
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype).numpy()


MAKERS = {"mlp": make_mlp, "cnn": make_cnn, "seq": make_seq}


# ----------------------------------------------------------------------------- references
def ref_jacobian(net, X, fn=None, prefixes=None, y=None):
    """Dense per-example Jacobians (n, m, p) of ``fn(logits, y_i)`` (default: the logits).

    Built from ``jacrev`` of ``functional_call`` on one example at a time; parameters in
    ``named_parameters()`` order, each flattened row-major.
    """
    net = net.eval()
    X = torch.as_tensor(X)
    names = [
        n for n, p in net.named_parameters()
        if p.requires_grad and (prefixes is None or any(n.startswith(pf) for pf in prefixes))
    ]
    params = {n: p.detach() for n, p in net.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in net.named_parameters() if n not in names}
    rest.update({n: b for n, b in net.named_buffers()})
    rows = []
    for i in range(X.shape[0]):
        yi = None if y is None else y[i : i + 1]

        def f(p, xi=X[i : i + 1], yi=yi):
            z = functional_call(net, {**p, **rest}, (xi,))
            z = z.reshape(1, -1)
            out = z if fn is None else fn(z, yi)
            return out.reshape(-1)

        J = jacrev(f)(params)
        rows.append(torch.cat([J[n].reshape(J[n].shape[0], -1) for n in names], dim=1))
    return torch.stack(rows).detach()  # (n, m, p)


def ref_ntk_blocks(JA, JB):
    """(n, n', m, m) blocks <J_A[i, c], J_B[j, c']>."""
    return torch.einsum("icp,jdp->ijcd", JA, JB)


def cosine_normalize(K, dA, dB):
    return K / torch.sqrt(dA[:, None] * dB[None, :])


def ref_kernel(kind, net, XA, XB, *, normalize, prefixes=None, yB=None, n_classes=None):
    """Brute-force kernel K(XA, XB) for a skattr kernel ``kind``.

    For "gradcos", ``yB`` are the (encoded) labels of the reference set ``XB``; ``XA`` is taken at
    the network's predicted labels, as GradCosKernel documents.
    """
    if kind == "trace":
        JA, JB = ref_jacobian(net, XA, prefixes=prefixes), ref_jacobian(net, XB, prefixes=prefixes)
        K = torch.einsum("icp,jcp->ij", JA, JB)
        dA, dB = (JA**2).sum((1, 2)), (JB**2).sum((1, 2))
    elif kind == "pseudo":
        JA, JB = ref_jacobian(net, XA, prefixes=prefixes), ref_jacobian(net, XB, prefixes=prefixes)
        C = JA.shape[1]
        gA, gB = JA.sum(1) / np.sqrt(C), JB.sum(1) / np.sqrt(C)
        K = gA @ gB.T
        dA, dB = (gA**2).sum(1), (gB**2).sum(1)
    elif kind == "full":
        JA, JB = ref_jacobian(net, XA, prefixes=prefixes), ref_jacobian(net, XB, prefixes=prefixes)
        K = ref_ntk_blocks(JA, JB)
        if normalize:
            tA, tB = (JA**2).sum((1, 2)), (JB**2).sum((1, 2))
            K = K / torch.sqrt(tA[:, None] * tB[None, :])[:, :, None, None]
        return K
    elif kind == "gradcos":
        with torch.no_grad():
            zA = net.eval()(torch.as_tensor(XA))
        yA = zA.argmax(1) if zA.shape[1] > 1 else (zA[:, 0] > 0).long()

        def loss(z, yi):
            if z.shape[1] == 1:
                return F.binary_cross_entropy_with_logits(z[:, 0], yi.to(z.dtype), reduction="none")
            return F.cross_entropy(z, yi, reduction="none")

        gA = ref_jacobian(net, XA, fn=loss, prefixes=prefixes, y=yA)[:, 0]
        gB = ref_jacobian(net, XB, fn=loss, prefixes=prefixes, y=torch.as_tensor(yB))[:, 0]
        K = gA @ gB.T
        dA, dB = (gA**2).sum(1), (gB**2).sum(1)
    else:
        raise ValueError(kind)
    return cosine_normalize(K, dA, dB) if normalize else K


def assert_rel_close(actual, expected, rtol=1e-5):
    """max |actual - expected| <= rtol * max |expected| (a relative error on the whole array)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected,
                          dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


def stored_features(trak):
    """Every model's stored TRAK features, (n_models, n_train, k), read block by block."""
    st = trak._features
    return np.stack([np.concatenate([np.asarray(F) for _, _, F, _ in st.iter_blocks(m)])
                     for m in range(st.n_models)])
