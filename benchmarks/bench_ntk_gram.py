"""Exact NTK Gram matrices: skattr's structured engine vs a naive ``vmap(jacrev)`` Gram (CPU).

For each network (MLP 64-256-256-10, 85,002 parameters; optionally a small CNN, Conv2d 1->16->32
on the 8x8 digit images + Linear, 25,290 parameters), trained briefly on sklearn digits:

* trace NTK on all 1,797 digits: ``TraceNTK(model, normalize=False).fit(X).transform(X)`` vs the
  naive route: per-example Jacobians ``J`` (n, 10, p) with ``torch.func.vmap(jacrev(...))`` in
  chunks, then ``K = sum_c J_c J_c^T`` (one GEMM on ``J`` reshaped to (n, 10 p));
* full eNTK (all 10 x 10 class blocks) on a subset: ``EmpiricalNTK(model, output="blocks",
  normalize=False).fit(X).transform(X)`` vs ``J J^T`` on ``J`` reshaped to (n 10, p).

Both sides run in this process, on the same trained network, in float32.  Errors: the largest
entrywise difference divided by the largest entry of the naive Gram, and the relative Frobenius
error.  Run ``python benchmarks/bench_ntk_gram.py`` (full) or ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    add_common_args,
    load_digits_data,
    make_cnn,
    make_mlp,
    n_params,
    print_table,
    setup,
    time_call,
    train,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--n", type=int, default=None, help="samples for the trace NTK (default all)")
    p.add_argument("--n-entk", type=int, default=256, help="samples for the full eNTK")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--no-entk", action="store_true", help="skip the full eNTK")
    p.add_argument("--chunk", type=int, default=128, help="naive Jacobian chunk size")
    p.add_argument("--naive-repeats", type=int, default=1,
                   help="timed naive runs (it is slow; warm-up is on a small subset)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_entk, args.repeats, args.naive_repeats, args.epochs = 200, 40, 1, 1, 1
    return args


# ------------------------------------------------------------------------------ naive reference
def naive_jacobians(module, X, chunk):
    """Per-example Jacobians of the logits, (n, C, p) float32, by vmap(jacrev) in chunks."""
    module = module.eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def f(p, x):
        return functional_call(module, (p, buffers), (x[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))
    Xt = torch.as_tensor(X)
    out = None
    for i in range(0, len(Xt), chunk):
        J = jac(params, Xt[i:i + chunk])
        J = torch.cat([J[k].flatten(2) for k in params], dim=2)  # (b, C, p)
        if out is None:
            out = torch.empty(len(Xt), J.shape[1], J.shape[2], dtype=J.dtype)
        out[i:i + len(J)] = J
    return out


def naive_trace_gram(module, X, chunk):
    J = naive_jacobians(module, X, chunk)
    Jf = J.reshape(J.shape[0], -1)  # sum_c J_c J_c^T == J(n, C p) J^T
    return Jf @ Jf.T


def naive_full_gram(module, X, chunk):
    J = naive_jacobians(module, X, chunk)
    n, C, p = J.shape
    Jr = J.reshape(n * C, p)
    return (Jr @ Jr.T).reshape(n, C, n, C).permute(0, 2, 1, 3)  # (n, n, C, C)


def errors(K, K_ref):
    K = np.asarray(K, dtype=np.float64)
    R = np.asarray(K_ref, dtype=np.float64)
    return (float(np.abs(K - R).max() / np.abs(R).max()),
            float(np.linalg.norm(K - R) / np.linalg.norm(R)))


def bench_model(name, args, X, y, n, ne):
    """Rows of the table for one network."""
    from skattr.estimators import EmpiricalNTK, TraceNTK

    module = make_mlp() if name == "mlp" else make_cnn()
    model, acc = train(module, X, y, epochs=args.epochs)
    net = model.module_
    P = n_params(net)
    label = "MLP 64-256-256-10" if name == "mlp" else "CNN conv16-conv32-fc"
    print(f"\n{label}: {P:,} params, train acc {acc:.3f}", flush=True)
    rows = []
    Xn, Xe = X[:n], X[:ne]

    # ---- trace NTK on n samples ----
    s_sec, s_all, K_s = time_call(
        lambda: TraceNTK(model, normalize=False).fit(Xn).transform(Xn), repeats=args.repeats)
    print(f"  skattr trace: {s_sec:.2f}s {['%.2f' % t for t in s_all]}", flush=True)
    naive_trace_gram(net, X[:64], args.chunk)  # warm-up
    n_sec, n_all, K_n = time_call(lambda: naive_trace_gram(net, Xn, args.chunk),
                                  repeats=args.naive_repeats, warmup=0)
    print(f"  naive trace: {n_sec:.2f}s {['%.2f' % t for t in n_all]}", flush=True)
    emax, efro = errors(K_s, K_n.numpy())
    rows.append([label, "trace NTK", n, P, s_sec, n_sec, n_sec / s_sec, emax, efro])
    del K_s, K_n

    # ---- full eNTK (C x C blocks) on ne samples ----
    if not args.no_entk:
        s_sec, s_all, K_s = time_call(
            lambda: EmpiricalNTK(model, output="blocks", normalize=False).fit(Xe).transform(Xe),
            repeats=args.repeats)
        print(f"  skattr eNTK: {s_sec:.2f}s {['%.2f' % t for t in s_all]}", flush=True)
        n_sec, n_all, K_n = time_call(lambda: naive_full_gram(net, Xe, args.chunk),
                                      repeats=args.naive_repeats, warmup=0)
        print(f"  naive eNTK: {n_sec:.2f}s {['%.2f' % t for t in n_all]}", flush=True)
        emax, efro = errors(K_s, K_n.numpy())
        rows.append([label, "full eNTK (10x10 blocks)", ne, P, s_sec, n_sec, n_sec / s_sec,
                     emax, efro])
    return rows


def main(argv=None):
    args = parse_args(argv)
    setup(args, "bench_ntk_gram: exact trace NTK / eNTK vs vmap(jacrev)")
    X, y = load_digits_data()
    n = len(X) if args.n is None else min(args.n, len(X))
    ne = min(args.n_entk, n)
    rows = []
    for name in args.models:
        rows += bench_model(name, args, X, y, n, ne)
    print_table(
        rows,
        ["network", "kernel", "n", "params", "skattr s", "vmap(jacrev) s", "speed-up",
         "max abs err / max|K|", "rel Frobenius err"],
        title=f"Exact Gram K(X, X), float32 (skattr: median of {args.repeats} after a warm-up; "
              f"naive: median of {args.naive_repeats} after a warm-up on 64 samples)",
    )


if __name__ == "__main__":
    main()
