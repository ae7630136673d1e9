"""Every attribution method on the digits LDS setup of the TRAK issue, in one table.

MLP 64-128-128-10 and the small CNN, 1,000 training / 200 test digits, the same 50 models
retrained on random halves as ground truth (``SubsetRetrainer``, cached under ``--cache``), the
same TRAK members: LDS of TRAK-1 / TRAK-10, TracIn (the full-data model's 30 epoch checkpoints,
exact gradients), influence functions (CG, LiSSA, EK-FAC; exact where the Hessian fits) and
Grad-Cos; beside it the Kendall-tau fidelity of a kernel-ridge surrogate on each method's kernel
next to the trace NTK's.

Usage::

    python benchmarks/attribution_comparison.py            # both architectures (~20 min)
    python benchmarks/attribution_comparison.py --archs mlp --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from skattr.reports.attribution import attribution_study, attribution_table, plot_attribution  # noqa: E402
from skattr.reports.trak import digits_split, make_cnn, make_mlp, template  # noqa: E402

ARCHS = {"mlp": (lambda: make_mlp(128, 2), False), "cnn": (make_cnn, True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=list(ARCHS))
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--projection-dim", type=int, default=2048)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "attribution"))
    p.add_argument("--cache", default=None, help="retrained models' cache (default: OUT/cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solvers", nargs="+", default=["cg", "lissa", "ekfac"],
                   help="influence-function solvers (exact is added for networks <= 5,000 parameters)")
    p.add_argument("--cg-iter", type=int, default=None, help="CG iterations (default: the estimator's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows_by_arch, out = {}, {}
    for arch in args.archs:
        make, images = ARCHS[arch]
        n_train, n_test = (300, 60) if args.quick else (1000, 200)
        Xtr, ytr, Xte, yte, _, _ = digits_split(images=images, n_train=n_train, n_test=n_test)
        model = template(make(), epochs=10 if args.quick else 30)
        t0 = time.perf_counter()
        res = attribution_study(
            model, Xtr, ytr, Xte, yte, n_subsets=8 if args.quick else args.n_subsets,
            n_models=3 if args.quick else 10, projection_dim=args.projection_dim,
            solvers=tuple(args.solvers), cg_iter=args.cg_iter,
            cache_dir=os.path.join(args.cache or os.path.join(args.out, "cache"), arch),
        )
        title = (f"{arch}: LDS on {n_test} test digits ({n_train} training; "
                 f"{res['retrainer'].n_subsets} models retrained on random halves; test accuracy "
                 f"of the full-data model {res['test_accuracy']:.3f}); {time.perf_counter() - t0:.0f} s")
        print(f"\n{title}\n\n{attribution_table(res['rows'])}", flush=True)
        rows_by_arch[arch] = res["rows"]
        out[arch] = {"title": title, "rows": res["rows"]}
    out["figure"] = plot_attribution(rows_by_arch, os.path.join(args.out, "attribution_methods.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
