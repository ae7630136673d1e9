"""Projected per-example gradient features: skattr vs traker vs plain training fwd+bwd (CPU).

Model: MLP 64-256-256-10 (85,002 parameters) trained briefly on sklearn digits (1,797 x 64,
X / 16, float32).  Output: TRAK's multiclass margin ``log p_y / (1 - p_y)`` at the true label.

1. Throughput at the same projection_dim (512 and 2048 by default):
   ``model.per_example_gradients(X, y, output="margin", projection_dim=k, projection=kind)`` on
   all 1,797 digits for every skattr projection kind, against ``traker``'s ``featurize`` (CPU
   ``BasicProjector``) on a subset (traker is slow), and against plain batched training
   forward + backward (mean cross-entropy, ``loss.backward()``) on the same model and batch size.
2. Accuracy: correlation and relative Frobenius error of the projected Gram ``F F^T`` on the
   first ``--n-acc`` digits against the exact Gram of the unprojected per-example margin
   gradients (traker's features are multiplied back by ``sqrt(n_params)`` and both are divided by
   ``sqrt(k)``, so every Gram is an unbiased estimate of the exact one).
3. Equal accuracy: for each skattr kind, the smallest k (on a grid; nested projections, so one
   featurisation at the largest k gives every smaller one) whose error, averaged over seeds, is at
   most traker's at ``--match-dim`` (2048), and the throughput of skattr at that k.

Run ``python benchmarks/bench_features.py`` (full) or ``--quick`` (smoke run).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _peers import traker_featurize  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    fwd_bwd_throughput,
    gram_errors,
    load_digits_data,
    make_mlp,
    n_params,
    print_table,
    setup,
    time_call,
    train,
)

KINDS = ("factored", "kronecker", "sparse", "rademacher", "gaussian")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048],
                   help="projection dims compared at equal k")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--n", type=int, default=None,
                   help="samples featurised by skattr (default: all 1,797)")
    p.add_argument("--n-traker", type=int, default=256, help="samples featurised by traker")
    p.add_argument("--n-acc", type=int, default=256,
                   help="samples of the accuracy check (the first ones, as traker's subset)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--traker-proj", default="normal", choices=["normal", "rademacher"],
                   help="traker BasicProjector type (normal: what traker picks on CPU)")
    p.add_argument("--traker-repeats", type=int, default=3,
                   help="timed traker runs per dim (seed = repeat index)")
    p.add_argument("--no-traker-prebuilt", action="store_true",
                   help="skip traker with block_size=proj_dim (matrix generated once)")
    p.add_argument("--match-dim", type=int, default=2048,
                   help="traker dim whose accuracy the equal-accuracy table matches")
    p.add_argument("--acc-seeds", type=int, default=3,
                   help="projection seeds averaged in the equal-accuracy search")
    p.add_argument("--grid", type=int, nargs="+",
                   default=[256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384,
                            24576, 32768],
                   help="k grid of the equal-accuracy search")
    p.add_argument("--dense-kmax", type=int, default=8192,
                   help="largest k tried for the dense kinds (rademacher, gaussian)")
    args = p.parse_args(argv)
    if args.quick:
        args.dims = [128, 256]
        args.n = 300
        args.n_traker = 32
        args.n_acc = 32
        args.repeats = 1
        args.traker_repeats = 1
        args.epochs = 1
        args.match_dim = 256
        args.acc_seeds = 1
        args.grid = [128, 256, 512, 1024, 2048]
        args.dense_kmax = 1024
    return args


def main(argv=None):
    args = parse_args(argv)
    setup(args, "bench_features: projected per-example margin gradients")
    X, y = load_digits_data()
    model, acc = train(make_mlp(), X, y, epochs=args.epochs)
    net = model.module_
    P = n_params(net)
    n = len(X) if args.n is None else min(args.n, len(X))
    Xs, ys = X[:n], y[:n]
    nt, na, bs = min(args.n_traker, n), min(args.n_acc, n), args.batch_size
    print(f"MLP 64-256-256-10, {P:,} params, train acc {acc:.3f}; skattr on {n} samples, "
          f"traker on {nt}, accuracy on the first {na}; batch {bs}; traker projector "
          f"{args.traker_proj}")

    # ---- exact Gram of the unprojected per-example margin gradients ----------------------
    G = model.per_example_gradients(X[:na], y[:na], output="margin", batch_size=bs)
    G = G.astype(np.float64)
    K_exact = G @ G.T
    del G

    def feats(kind, k, seed, Xa=Xs, ya=ys):
        return model.per_example_gradients(Xa, ya, output="margin", projection_dim=k,
                                           projection=kind, random_state=seed, batch_size=bs)

    fb_net, fb_rates = copy.deepcopy(net), []
    tnet = copy.deepcopy(net)
    variants = [("traker", 100)] + ([] if args.no_traker_prebuilt else [("traker-prebuilt", None)])

    def run_traker(k, block, seed, n_rows=nt):
        tm = {}
        F, sec = traker_featurize(tnet, X[:n_rows], y[:n_rows], proj_dim=k, batch_size=bs,
                                  proj_type=args.traker_proj, seed=seed, block_size=block,
                                  unnormalize=True, timings=tm)
        return F / math.sqrt(k), sec, tm["setup_s"]  # an unbiased estimate of <g, g'>

    # ---- phase 1 (untimed): accuracy --------------------------------------------------------
    run_traker(min(args.dims), 100, 0, n_rows=min(32, nt))  # warm-up (one-off start-up cost)
    terr = [gram_errors(run_traker(args.match_dim, 100, s, n_rows=na)[0], K_exact)
            for s in range(args.acc_seeds)]
    target = dict(corr=float(np.mean([e[0] for e in terr])),
                  rel=float(np.mean([e[1] for e in terr])))
    print(f"Accuracy target: traker at k={args.match_dim}, Gram rel err {target['rel']:.4f} "
          f"(corr {target['corr']:.4f}), mean over {args.acc_seeds} seeds; skattr curves "
          f"(Gram rel err, mean over {args.acc_seeds} seeds):", flush=True)
    curves, kstar = {}, {}
    for kind in args.kinds:
        kmax = max(args.grid) if kind in ("factored", "kronecker", "sparse") else min(max(args.grid),
                                                                        args.dense_kmax)
        grid = [k for k in args.grid if k <= kmax]
        errs = {k: [] for k in grid}
        for s in range(args.acc_seeds):
            F = feats(kind, kmax, s, X[:na], y[:na]) * math.sqrt(kmax)  # unscaled, nested
            for k in grid:
                errs[k].append(gram_errors(F[:, :k] / math.sqrt(k), K_exact))
        curves[kind] = {k: (float(np.mean([e[0] for e in v])), float(np.mean([e[1] for e in v])))
                        for k, v in errs.items()}
        hit = [k for k in grid if curves[kind][k][1] <= target["rel"]]
        kstar[kind] = hit[0] if hit else None
        print(f"  {kind}: " + ", ".join(f"k={k}: {curves[kind][k][1]:.4f}" for k in grid)
              + f" -> k* = {kstar[kind] or '> %d' % kmax}", flush=True)

    # ---- phase 2: timing, in interleaved rounds (seed = round) ----------------------------
    # Every round times plain fwd+bwd, traker and each skattr configuration once, so slow
    # changes of the shared machine's load hit all of them alike; medians over rounds.
    tk_dims = sorted(set(args.dims) | {args.match_dim})
    sk_cfg = sorted({(kind, k) for kind in args.kinds for k in args.dims}
                    | {(kind, k) for kind, k in kstar.items() if k is not None})
    for kind in args.kinds:
        feats(kind, min(args.dims), 0, X[:bs], y[:bs])  # untimed warm-up
    t_sec, t_setup, t_err, s_sec, s_err = {}, {}, {}, {}, {}
    rounds = max(args.repeats, args.traker_repeats)
    for r in range(rounds):
        rate, _ = fwd_bwd_throughput(fb_net, Xs, ys, batch_size=bs, repeats=5)
        fb_rates.append(rate)
        print(f"round {r}: plain training fwd+bwd (batch {bs}): {rate:,.0f} samples/s", flush=True)
        if r < args.traker_repeats:
            for k in tk_dims:
                for name, block in variants:
                    F, sec, setup_s = run_traker(k, k if block is None else block, r)
                    t_sec.setdefault((name, k), []).append(sec)
                    t_setup.setdefault((name, k), []).append(setup_s)
                    t_err.setdefault((name, k), []).append(gram_errors(F[:na], K_exact))
                    print(f"  {name} k={k}: {nt / sec:,.1f} samples/s (setup {setup_s:.2f}s, "
                          "untimed)", flush=True)
        if r < args.repeats:
            for kind, k in sk_cfg:
                sec, _, F = time_call(lambda c=(kind, k, r): feats(*c), repeats=1, warmup=0)
                s_sec.setdefault((kind, k), []).append(sec)
                s_err.setdefault((kind, k), []).append(gram_errors(F[:na], K_exact))
                print(f"  skattr {kind} k={k}: {n / sec:,.0f} samples/s", flush=True)

    def summary(secs, errs, count):
        sec = float(np.median(secs))
        return dict(sec=sec, rate=count / sec, corr=float(np.mean([e[0] for e in errs])),
                    rel=float(np.mean([e[1] for e in errs])))

    trk = {key: summary(t_sec[key], t_err[key], nt) for key in t_sec}
    sk = {key: summary(s_sec[key], s_err[key], n) for key in s_sec}
    fb_rate = float(np.median(fb_rates))

    rows = []
    for k in args.dims:
        base = trk["traker", k]["rate"]
        for name, _ in variants:
            t = trk[name, k]
            rows.append([name, k, nt, t["sec"], t["rate"], t["rate"] / base, t["rate"] / fb_rate,
                         t["corr"], t["rel"]])
        for kind in args.kinds:
            s = sk[kind, k]
            rows.append([f"skattr {kind}", k, n, s["sec"], s["rate"], s["rate"] / base,
                         s["rate"] / fb_rate, s["corr"], s["rel"]])
    rows.append([f"plain training fwd+bwd (batch {bs})", "-", n, n / fb_rate, fb_rate, "-", 1.0,
                 "-", "-"])
    print_table(
        rows,
        ["method", "k", "n", "seconds", "samples/s", "x traker (same k)", "x fwd+bwd",
         "Gram corr", "Gram rel err"],
        title=f"Table 1: same projection_dim (median of {args.repeats} skattr / "
              f"{args.traker_repeats} traker runs in interleaved rounds, seed = round; Gram "
              f"errors on the first {na} samples, mean over those seeds)",
    )
    if not args.no_traker_prebuilt:
        print("traker-prebuilt: block_size=proj_dim, so BasicProjector builds the whole "
              "(n_params x k) matrix once in its constructor; that setup is outside the timer ("
              + ", ".join(f"k={k}: {np.median(t_setup['traker-prebuilt', k]):.2f}s"
                          for k in args.dims) + ").")

    # ---- equal accuracy ------------------------------------------------------------------------
    t = trk["traker", args.match_dim]
    rows = [[f"traker ({args.traker_proj}, block 100)", args.match_dim, 1.0, target["corr"],
             target["rel"], t["rate"], 1.0, t["rate"] / fb_rate]]
    for kind in args.kinds:
        k = kstar[kind]
        if k is None:
            kmax = max(curves[kind])
            rows.append([f"skattr {kind}", f"> {kmax}", "-", curves[kind][kmax][0],
                         curves[kind][kmax][1], "-", "-", "-"])
            continue
        rate = sk[kind, k]["rate"]
        rows.append([f"skattr {kind}", k, k / args.match_dim, curves[kind][k][0],
                     curves[kind][k][1], rate, rate / t["rate"], rate / fb_rate])
    print_table(
        rows,
        ["method", "k", "k / traker k", "Gram corr", "Gram rel err", "samples/s",
         "x traker", "x fwd+bwd"],
        title=f"Table 2: equal accuracy: smallest grid k whose Gram rel err (mean over "
              f"{args.acc_seeds} seeds, first {na} samples) is <= traker's at k={args.match_dim}",
    )


if __name__ == "__main__":
    main()
