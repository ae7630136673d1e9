"""Projected kernels converge to the exact ones: error against the exact kernel at k = 64 ... 4096.

For every kernel (trace NTK, pseudo NTK, full eNTK as (sample, class) blocks, Grad-Cos) and
projection kind, on a trained MLP 64-256-256-10 and a small CNN (``common.py``), fit on ``--n``
digits and transform ``--n-test`` others, unnormalised (``normalize=False``: the raw inner
products the projection estimates), float64 so that the error is the projection's alone.  Printed:
relative Frobenius error ``|K_k - K|_F / |K|_F``, mean over ``--seeds`` projection seeds.
Projections are nested, so one featurisation at the largest k (through a ``FeatureCache``) gives
every smaller k.

Usage::

    python benchmarks/kernel_convergence.py            # ~5 min on one core
    python benchmarks/kernel_convergence.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, load_digits_data, make_cnn, make_mlp, print_table, setup, train  # noqa: E402

from skattr import TorchModel  # noqa: E402
from skattr.cache import FeatureCache  # noqa: E402
from skattr.estimators import EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK  # noqa: E402

KERNELS = {
    "trace NTK": (TraceNTK, {}),
    "pseudo NTK": (PseudoNTK, {}),
    "eNTK blocks": (EmpiricalNTK, {"output": "blocks"}),
    "Grad-Cos (unnormalised)": (GradCosKernel, {}),
}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--kinds", nargs="+", default=["factored", "kronecker", "sparse", "rademacher"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"])
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_test, args.dims, args.seeds, args.epochs = 40, 10, [64, 256], 1, 1
        args.kinds = ["factored", "kronecker"]
    setup(args, "kernel_convergence: projected vs exact kernels")
    X, y = load_digits_data()
    rows = []
    for arch in args.archs:
        net = make_mlp() if arch == "mlp" else make_cnn()
        trained, _ = train(net, X[:1000], y[:1000], epochs=args.epochs)
        model = TorchModel(trained.module_.double(), dtype="float64")
        Xf, Xt = X[1000:1000 + args.n], X[1500:1500 + args.n_test]
        for name, (cls, kw) in KERNELS.items():
            E = cls(model, normalize=False, **kw).fit(Xf).transform(Xt)
            for kind in args.kinds:
                errs = {k: [] for k in args.dims}
                for s in range(args.seeds):
                    cache = FeatureCache()
                    for k in sorted(args.dims, reverse=True):  # largest first: the rest are slices
                        K = cls(model, normalize=False, projection_dim=k, projection=kind,
                                memory=cache, random_state=s, **kw).fit(Xf).transform(Xt)
                        errs[k].append(np.linalg.norm(K - E) / np.linalg.norm(E))
                row = [arch.upper(), name, kind] + [float(np.mean(errs[k])) for k in args.dims]
                rows.append(row)
                print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row),
                      flush=True)
    print_table(rows, ["network", "kernel", "projection"] + [f"k={k}" for k in args.dims],
                title=f"Relative Frobenius error of projected vs exact kernels (fit {args.n}, "
                      f"transform {args.n_test} digits; float64; mean over {args.seeds} seeds)")


if __name__ == "__main__":
    main()
