"""Surrogates on a million points: a linear model on the projected trace NTK's feature map.

What it runs (one process, ``torch.set_num_threads`` from ``--threads``, default 1):

1. **Setup.**  MLP 64-256-256-10 (85,002 parameters) trained 5 epochs on digits rows
   0..1499; the test points are digits rows 1500..1796 (297).  The big training set is digits
   *jittered*: row i is a random one of the 1,500 training images shifted by -1/0/+1 pixel in
   each direction (zero fill) plus Gaussian noise (sd 0.05), clipped to [0, 1], generated chunk
   by chunk from ``SeedSequence([seed, chunk])`` (never held whole).  Its labels are the
   network's own predictions (a surrogate imitates the network, as ``KernelSurrogate`` does
   with ``y=None``).
2. **Streaming fit.**  ``fmap = TraceNTK(model, projection_dim=k, output="features")``; for each
   chunk of ``--chunk`` rows: ``SGDClassifier(loss="log_loss").partial_fit(fmap.transform(X_c)
   .astype(float32), y_c)``: one pass, neither the n x n kernel nor the n x (10 k) feature
   matrix is ever held.  Kendall-tau fidelity on the test points at checkpoints; peak memory
   (``ru_maxrss``: the whole process, torch and Python included) before and after; wall time
   split into featurisation and SGD.
3. **Exact-kernel surrogates on a 2,000-row subsample** (the first 2,000 jittered rows, the
   same labels): ``KernelSurrogate(TraceNTK(model), "kglm")`` and ``"klr"`` (the exact trace
   NTK, a 2,000 x 2,000 kernel matrix), and, to separate the effect of n from that of the
   projection, the feature map with the same SGD and with ``LogisticRegression`` on the same
   2,000 rows.  Same test points, same fidelity function (``make_fidelity_scorer``).
4. **Sizing** (``--sizing``): featurisation time per example of the trace NTK's feature map at
   projection_dim 256 / 1024 / 4096 on 2,000 jittered rows, and bytes per example (10 classes x
   k x 4 bytes in float32, x 2 in float16).

Usage::

    python benchmarks/bench_scale.py --n 1000000 --k 128          # the 10^6-row fit
    python benchmarks/bench_scale.py --n 200000 --k 1024          # k = 1024
    python benchmarks/bench_scale.py --sizing --n 0               # sizing table only
    python benchmarks/bench_scale.py --quick                      # smoke run (n = 20,000, k = 64)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, load_digits_data, make_mlp, setup, train  # noqa: E402

from skattr.estimators import TraceNTK  # noqa: E402
from skattr.surrogates import KernelSurrogate, kendall_tau_fidelity, make_fidelity_scorer  # noqa: E402


def rss_mib():
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib():
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jittered(X_base, n, chunk, seed=0):
    """Yield (i0, X_chunk) of ``n`` jittered digits, chunk by chunk (deterministic in seed)."""
    imgs_all = X_base.reshape(-1, 8, 8)
    for c, i0 in enumerate(range(0, n, chunk)):
        m = min(chunk, n - i0)
        rng = np.random.default_rng([seed, c])
        imgs = imgs_all[rng.integers(0, len(imgs_all), m)]
        dy, dx = rng.integers(-1, 2, m), rng.integers(-1, 2, m)
        out = np.zeros_like(imgs)
        for sy in (-1, 0, 1):
            for sx in (-1, 0, 1):
                sel = (dy == sy) & (dx == sx)
                if not sel.any():
                    continue
                src = imgs[sel]
                dst = np.zeros_like(src)
                ys, yd = (slice(0, 8 - sy), slice(sy, 8)) if sy >= 0 else (slice(-sy, 8), slice(0, 8 + sy))
                xs, xd = (slice(0, 8 - sx), slice(sx, 8)) if sx >= 0 else (slice(-sx, 8), slice(0, 8 + sx))
                dst[:, yd, xd] = src[:, ys, xs]
                out[sel] = dst
        out += rng.normal(0, 0.05, out.shape).astype(out.dtype)
        yield i0, np.clip(out, 0, 1).reshape(m, 64).astype(np.float32)


def tau_of(model, proba, X_test, y_test):
    P = model.predict_proba(X_test)
    return kendall_tau_fidelity(P, proba, classes=y_test)


def streaming_fit(model, X_base, X_test, y_test, args):
    from sklearn.linear_model import SGDClassifier

    fmap = TraceNTK(model, projection_dim=args.k, output="features",
                    batch_size=args.batch_size).fit(X_base[:1])
    classes = np.asarray(model.class_labels())
    F_test = fmap.transform(X_test).astype(np.float32)
    sgd = SGDClassifier(loss="log_loss", alpha=args.alpha, average=args.average, random_state=0)
    checkpoints = sorted({c for c in (2_000, 10_000, 100_000, 200_000, 1_000_000) if c < args.n} | {args.n})
    rss0, peak0 = rss_mib(), peak_mib()
    print(f"\n-- streaming fit: n = {args.n:,}, TraceNTK(projection_dim={args.k}, output='features'), "
          f"{len(classes)} classes -> {len(classes) * args.k} features per row, chunks of {args.chunk:,}, "
          f"SGDClassifier(loss='log_loss', alpha={args.alpha}, average={args.average}) one pass of partial_fit")
    print(f"   before: RSS {rss0:.0f} MiB, peak so far {peak0:.0f} MiB")
    t_feat = t_sgd = t_label = 0.0
    done, taus = 0, []
    t0 = time.perf_counter()
    for i0, Xc in jittered(X_base, args.n, args.chunk, seed=args.seed):
        ta = time.perf_counter()
        yc = model.predict(Xc)
        tb = time.perf_counter()
        Fc = fmap.transform(Xc).astype(np.float32)
        tc = time.perf_counter()
        sgd.partial_fit(Fc, yc, classes=classes)
        td = time.perf_counter()
        t_label, t_feat, t_sgd = t_label + tb - ta, t_feat + tc - tb, t_sgd + td - tc
        done = i0 + len(Xc)
        # checkpoints fall on chunk ends: report at the first chunk end at or past each
        while checkpoints and done >= checkpoints[0]:
            checkpoints.pop(0)
            tau = tau_of(model, sgd.predict_proba(F_test), X_test, y_test)
            taus.append((done, tau))
            print(f"   n = {done:>9,}  tau = {tau:.4f}  elapsed {time.perf_counter() - t0:7.1f} s  "
                  f"RSS {rss_mib():.0f} MiB  peak {peak_mib():.0f} MiB", flush=True)
    wall = time.perf_counter() - t0
    print(f"   wall {wall:.1f} s (featurise {t_feat:.1f} s = {t_feat / args.n * 1e6:.0f} us/row, "
          f"SGD {t_sgd:.1f} s, network labels {t_label:.1f} s); accuracy of the surrogate against the "
          f"network on the test points {np.mean(sgd.predict(F_test) == model.predict(X_test)):.4f}")
    print(f"   peak RSS {peak_mib():.0f} MiB (increase over the setup's peak: {peak_mib() - peak0:.0f} MiB; "
          f"one chunk's float64 features: {args.chunk * len(classes) * args.k * 8 / 2**20:.0f} MiB)")
    return fmap, taus, wall


def exact_subsample(model, X_base, X_test, y_test, args):
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import make_pipeline

    n_sub = args.n_sub
    Xs = np.concatenate([x for _, x in jittered(X_base, n_sub, args.chunk, seed=args.seed)])
    ys = model.predict(Xs)
    score = make_fidelity_scorer(model)
    print(f"\n-- {n_sub:,}-row subsample (the first {n_sub:,} jittered rows, labels = the network's "
          "predictions), same test points")
    rows = []
    exact = []
    for kk in ([] if args.fmap_only else args.sub_kernels.split(",")):
        what = "exact trace NTK" if kk == "exact" else f"projected trace NTK k={kk}"
        pd = None if kk == "exact" else int(kk)
        for est in ("kglm", "klr"):
            exact.append((f"{what}, KernelSurrogate {est!r}",
                          KernelSurrogate(TraceNTK(model, projection_dim=pd), est)))
    for name, est in exact:
        t0 = time.perf_counter()
        est.fit(Xs)
        rows.append((name, est.score(X_test, y_test), time.perf_counter() - t0))
    for name, lin in (
        (f"feature map k={args.k}, SGDClassifier(log_loss, alpha={args.alpha}, average={args.average})",
         SGDClassifier(loss="log_loss", alpha=args.alpha, average=args.average, random_state=0)),
        (f"feature map k={args.k}, LogisticRegression(C=1)", LogisticRegression(C=1.0, max_iter=2000)),
    ):
        t0 = time.perf_counter()
        pipe = make_pipeline(TraceNTK(model, projection_dim=args.k, output="features",
                                      batch_size=args.batch_size), lin).fit(Xs, ys)
        rows.append((name, score(pipe, X_test, y_test), time.perf_counter() - t0))
    for name, tau, sec in rows:
        print(f"   {name:<60s} tau = {tau:.4f}   fit {sec:6.1f} s")
    print(f"   peak RSS after the subsample fits {peak_mib():.0f} MiB")
    return rows


def sizing(model, X_base, args):
    n = 500 if args.quick else 2000
    Xs = np.concatenate([x for _, x in jittered(X_base, n, n, seed=args.seed + 1)])
    C = len(model.class_labels())
    print(f"\n-- sizing: featurisation time per example, TraceNTK(output='features'), {n:,} rows, "
          f"batch_size {args.batch_size}, median of {args.repeats}")
    print("   (wall: perf_counter; CPU: process_time, what one dedicated core would take)")
    print("   | projection_dim | features per example | bytes/example float32 | float16 | us/example wall | us/example CPU |")
    for k in (256, 1024, 4096):
        fmap = TraceNTK(model, projection_dim=k, output="features", batch_size=args.batch_size).fit(Xs[:1])
        fmap.transform(Xs[:64])  # warm-up (draws the projection)
        wall, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fmap.transform(Xs)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        us, us_cpu = float(np.median(wall)) / n * 1e6, float(np.median(cpu)) / n * 1e6
        print(f"   | {k} | {C * k:,} | {C * k * 4:,} | {C * k * 2:,} | {us:.0f} | {us_cpu:.0f} |", flush=True)


def main():
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the streaming fit (0: skip it)")
    p.add_argument("--k", type=int, default=128, help="projection_dim of the feature map")
    p.add_argument("--chunk", type=int, default=4096, help="rows per partial_fit chunk")
    p.add_argument("--batch-size", type=int, default=512, help="TraceNTK batch_size (rows per gradient batch)")
    p.add_argument("--alpha", type=float, default=1e-5, help="SGDClassifier alpha")
    p.add_argument("--average", action="store_true", help="averaged SGD (SGDClassifier(average=True))")
    p.add_argument("--n-sub", type=int, default=2000, help="rows of the exact-kernel subsample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizing", action="store_true", help="also time featurisation at k = 256/1024/4096")
    p.add_argument("--no-exact", action="store_true", help="skip the subsample surrogates")
    p.add_argument("--sub-kernels", default="exact",
                   help="kernels of the subsample's KernelSurrogates: 'exact' and/or projection_dims, "
                        "comma-separated (e.g. exact,128)")
    p.add_argument("--fmap-only", action="store_true",
                   help="on the subsample, only the feature-map models (not the exact-kernel ones)")
    args = p.parse_args()
    if args.quick:
        args.n, args.k, args.n_sub, args.repeats = 20_000, 64, 500, 1
    setup(args, "bench_scale: a linear model on the projected trace NTK's feature map")
    X, y = load_digits_data()
    model, acc = train(make_mlp(), X[:1500], y[:1500], epochs=args.epochs)
    X_test, y_test = X[1500:], y[1500:]
    print(f"network: MLP 64-256-256-10, {args.epochs} epochs on digits[:1500]; train accuracy {acc:.4f}, "
          f"test accuracy {model.score(X_test, y_test):.4f} (297 test points)")
    if args.n:
        streaming_fit(model, X[:1500], X_test, y_test, args)
    if not args.no_exact:
        exact_subsample(model, X[:1500], X_test, y_test, args)
    if args.sizing:
        sizing(model, X[:1500], args)


if __name__ == "__main__":
    main()
