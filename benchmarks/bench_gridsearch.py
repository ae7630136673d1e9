"""GridSearchCV over 4 projection sizes vs a single featurisation (CPU).

    GridSearchCV(make_pipeline(TraceNTK(model, projection_dim=..., memory=FeatureCache()),
                               SVC(kernel="precomputed")),
                 {"tracentk__projection_dim": [256, 512, 1024, 2048]}, cv=3,
                 scoring=make_fidelity_scorer(model)).fit(X, y)

against one featurisation at the largest size, ``TraceNTK(model, projection_dim=2048)``
``.fit_transform(X)`` (features once, then the Gram), on all 1,797 digits with the MLP 64-256-256-10.  Because skattr's
projections are nested and the :class:`skattr.cache.FeatureCache` is shared by every clone, the
search featurises each sample once (up to 2048 rows, extended 256 -> 512 -> 1024 -> 2048) and
then only computes Gram matrices and SVMs; the same search without the cache is timed for
reference.  Run ``python benchmarks/bench_gridsearch.py`` (full) or ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    add_common_args,
    load_digits_data,
    make_mlp,
    print_table,
    setup,
    time_call,
    train,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--cv", type=int, default=3)
    p.add_argument("--n", type=int, default=None, help="samples (default: all 1,797)")
    p.add_argument("--projection", default="factored",
                   choices=["factored", "sparse", "rademacher", "gaussian"])
    p.add_argument("--no-uncached", action="store_true", help="skip the search without cache")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.n, args.repeats, args.epochs = [32, 64, 128, 256], 300, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    setup(args, "bench_gridsearch: GridSearchCV over projection_dim vs one featurisation")
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    from skattr.cache import FeatureCache
    from skattr.estimators import TraceNTK
    from skattr.surrogates import make_fidelity_scorer

    X, y = load_digits_data()
    n = len(X) if args.n is None else min(args.n, len(X))
    X, y = X[:n], y[:n]
    model, acc = train(make_mlp(), X, y, epochs=args.epochs)
    kmax = max(args.dims)
    print(f"MLP 64-256-256-10, train acc {acc:.3f}; n={n}; dims {args.dims}; cv={args.cv}; "
          f"projection {args.projection}; 1 + {len(args.dims)} x {args.cv} pipeline fits")

    def single():
        kern = TraceNTK(model, projection_dim=kmax, projection=args.projection)
        return kern.fit_transform(X)

    last = {}

    def search(cached):
        memory = FeatureCache() if cached else None
        pipe = make_pipeline(
            TraceNTK(model, projection_dim=min(args.dims), projection=args.projection,
                     memory=memory),
            SVC(kernel="precomputed"),
        )
        gs = GridSearchCV(pipe, {"tracentk__projection_dim": list(args.dims)}, cv=args.cv,
                          scoring=make_fidelity_scorer(model))
        gs.fit(X, y)
        last["gs"], last["memory"] = gs, memory
        return gs

    rows = []
    s_sec, s_all, _ = time_call(single, repeats=args.repeats)
    print(f"  single featurisation k={kmax}: {s_sec:.2f}s {['%.2f' % t for t in s_all]}",
          flush=True)
    c_sec, c_all, gs = time_call(lambda: search(True), repeats=args.repeats)
    mem = last["memory"]
    print(f"  GridSearchCV + FeatureCache: {c_sec:.2f}s {['%.2f' % t for t in c_all]}; cache "
          f"hits {mem.hits}, misses {mem.misses}, {mem.nbytes() / 2**20:.0f} MiB", flush=True)
    scores = ", ".join(f"k={p['tracentk__projection_dim']}: {s:.3f}"
                       for p, s in zip(gs.cv_results_["params"],
                                       gs.cv_results_["mean_test_score"]))
    print(f"  fidelity (Kendall tau, mean over folds): {scores}; best "
          f"{gs.best_params_['tracentk__projection_dim']}")
    f_sec, f_all, _ = time_call(
        lambda: TraceNTK(model, projection_dim=kmax, projection=args.projection).fit(X),
        repeats=args.repeats)
    print(f"  fit only (features, no Gram) k={kmax}: {f_sec:.2f}s {['%.2f' % t for t in f_all]}",
          flush=True)
    rows.append([f"TraceNTK(projection_dim={kmax}).fit_transform(X)", 1, s_sec, 1.0])
    rows.append([f"  reference: TraceNTK(projection_dim={kmax}).fit(X) only (no Gram)", 1, f_sec,
                 f_sec / s_sec])
    rows.append([f"GridSearchCV, {len(args.dims)} dims x cv={args.cv}, FeatureCache",
                 1 + len(args.dims) * args.cv, c_sec, c_sec / s_sec])
    if not args.no_uncached:
        u_sec, u_all, _ = time_call(lambda: search(False), repeats=1, warmup=0)
        print(f"  GridSearchCV without cache: {u_sec:.2f}s", flush=True)
        rows.append([f"GridSearchCV, {len(args.dims)} dims x cv={args.cv}, no cache",
                     1 + len(args.dims) * args.cv, u_sec, u_sec / s_sec])
    print_table(rows, ["what", "pipeline fits", "seconds", "x single featurisation"],
                title=f"n={n}, MLP 64-256-256-10, TraceNTK {args.projection} (median of "
                      f"{args.repeats} after a warm-up; the uncached search: 1 run)")


if __name__ == "__main__":
    main()
