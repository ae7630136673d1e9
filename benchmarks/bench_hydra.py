"""HYDRA: its cost over plain training, and what the Hessian-free recursion loses.

Part ``speed`` (one process, same data, network and training recipe): the MLP 64-256-256-10 on
the digits training set (1,500 examples; SGD, momentum 0.9, weight decay 5e-4, cosine learning
rate, batch 64), timed as

* plain training: ``TorchModel(...).fit`` with a ``TrajectoryRecorder``;
* ``HYDRA(model, projection_dim=1024).fit`` (trains and carries ``P d_i`` for all 1,500
  examples in the same pass);
* the lean replay ``HYDRA(model, mode="lean", trajectory=recorder).fit(X, y, X_target=...)``
  (one scalar per example and target, 100 targets; the run is replayed, not retrained);
* the same with ``target_reduction="mean"`` (the 100 targets' mean loss as one objective: one
  scalar per example), with and without ``lean_self_influence``;
* ``HYDRA(model, hessian="exact", track=...)`` on a few tracked examples (Hessian-vector
  products at every step), whose cost grows linearly with the number tracked;

each as a ratio to the plain training time (median of ``--repeats``, all runs interleaved
round-robin after one warm-up each), in wall-clock seconds and in this process's CPU seconds.

Part ``lean``: only plain training and the four lean replays (100 targets or their mean, with
or without ``lean_self_influence``) of ``speed``, round-robin, this process's CPU seconds: the
median over the rounds of each replay's CPU time over the same round's training, and every
round's ratio.

Part ``error``: a small MLP (64-16-10) on 200 digits, trained for 1 ... 16 epochs; the relative
error of the Hessian-free and Gauss-Newton hypergradients (and of their scores on 100 test
points) against the exact ones (``hessian="exact"`` equals autograd through the unrolled run to
1e-6, ``tests/test_hydra.py``).

Part ``ab`` (``--old DIR``): the same projected and lean runs of an older checkout ``DIR``
(e.g. ``git worktree add /tmp/old <commit>``), its package imported as ``skattr_old`` from a
link, interleaved round-robin with this tree's in one process; each tree's ratio to its own
training and the largest difference of their scores.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_hydra.py                # both parts (a few minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_hydra.py --part ab --old /tmp/old --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/bench_hydra.py --part error
    OMP_NUM_THREADS=1 python benchmarks/bench_hydra.py --part lean --repeats 15
    OMP_NUM_THREADS=1 python benchmarks/bench_hydra.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import add_common_args, load_digits_data, make_mlp, print_table, setup  # noqa: E402

from skattr import TorchModel, TrajectoryRecorder  # noqa: E402
from skattr.estimators.hydra import HYDRA  # noqa: E402


def _recipe(module, epochs, **kw):
    p = dict(epochs=epochs, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
             lr_schedule="cosine", device="cpu", random_state=0)
    p.update(kw)
    return TorchModel(module, **p)


def _interleaved(runs, repeats, cpu=None, rounds=None):
    """Median seconds of each run, the runs interleaved round-robin after one warm-up each (the
    machine's load then affects them alike).  With a dict ``cpu``, also the median CPU seconds
    of this process (``time.process_time``; less sensitive to other processes on the machine)
    and, under ``(name, "ratio")``, the median over the rounds of each run's CPU seconds over the
    first run's in the same round.  With a dict ``rounds``, each run's wall seconds of every
    round."""
    outs = {name: fn() for name, fn in runs.items()}
    ts = {name: [] for name in runs}
    cs = {name: [] for name in runs}
    for _ in range(max(1, repeats)):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            ts[name].append(time.perf_counter() - t0)
            cs[name].append(time.process_time() - c0)
    if cpu is not None:
        cpu.update({name: float(np.median(v)) for name, v in cs.items()})
        first = np.asarray(cs[next(iter(runs))])
        cpu.update({(name, "ratio"): float(np.median(np.asarray(v) / first)) for name, v in cs.items()})
    if rounds is not None:
        rounds.update(ts)
    return {name: float(np.median(v)) for name, v in ts.items()}, outs


def part_speed(args):
    X, y = load_digits_data()
    n = 300 if args.quick else 1500
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:n + 100], y[n:n + 100]
    epochs = 2 if args.quick else args.epochs
    k = 1024
    n_exact = 4 if args.quick else 8

    def train():
        return _recipe(make_mlp(), epochs, callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)

    model = train()
    rec = model.callbacks_[0]
    steps = len(rec.batches_)
    track = np.arange(n_exact)
    runs = {
        "train": train,
        "proj": lambda: HYDRA(_recipe(make_mlp(), epochs), projection_dim=k).fit(Xtr, ytr),
        "lean": lambda: HYDRA(_recipe(make_mlp(), epochs), mode="lean", trajectory=rec).fit(
            Xtr, ytr, X_target=Xte, y_target=yte),
        "lean_mean": lambda: HYDRA(_recipe(make_mlp(), epochs), mode="lean", trajectory=rec,
                                   target_reduction="mean").fit(
            Xtr, ytr, X_target=Xte, y_target=yte),
        "lean_mean_noself": lambda: HYDRA(_recipe(make_mlp(), epochs), mode="lean", trajectory=rec,
                                          target_reduction="mean", lean_self_influence=False).fit(
            Xtr, ytr, X_target=Xte, y_target=yte),
        "lean_full": lambda: HYDRA(_recipe(make_mlp(), epochs), mode="lean").fit(
            Xtr, ytr, X_target=Xte, y_target=yte),
        "none_sub": lambda: HYDRA(_recipe(make_mlp(), epochs), hessian="none", track=track).fit(Xtr, ytr),
        "exact": lambda: HYDRA(_recipe(make_mlp(), epochs), hessian="exact", track=track).fit(Xtr, ytr),
    }
    cpu, rounds = {}, {}
    times, outs = _interleaved(runs, args.repeats, cpu, rounds)
    hp, hl = outs["proj"], outs["lean"]
    # agreement of projected and lean scores on the same targets (lean: exact inner products)
    Sp, Sl = hp.attribute(Xte, yte), hl.attribute(None)
    rho = np.mean([spearmanr(a, b)[0] for a, b in zip(Sp, Sl)])
    # the mean objective against the mean of the 100 per-target rows (float32 network)
    Sm, Sn = outs["lean_mean"].attribute(None)[0], outs["lean_mean_noself"].attribute(None)[0]
    mean_err = max(np.linalg.norm(S - Sl.mean(0)) / np.linalg.norm(Sl.mean(0)) for S in (Sm, Sn))
    acc = float(model.score(Xte, yte))
    what = {
        "train": ("plain training (TorchModel.fit + recorder)", "-"),
        "proj": (f"HYDRA projection_dim={k}, all {n} examples (trains once)", "<= 2"),
        "lean": (f"HYDRA lean replay, {len(Xte)} targets + self-influence (replays the recorder)", "<= 1.5"),
        "lean_mean": (f"HYDRA lean replay, target_reduction='mean' ({len(Xte)} targets' mean) "
                      "+ self-influence", "<= 1.5"),
        "lean_mean_noself": ("HYDRA lean replay, target_reduction='mean', lean_self_influence=False",
                             "<= 1.5"),
        "lean_full": ("HYDRA lean, training + replay", "-"),
        "exact": (f"HYDRA hessian='exact', {n_exact} tracked", "-"),
        "none_sub": (f"HYDRA hessian='none' (full vectors), {n_exact} tracked", "-"),
    }
    rows = [[label, times[key], times[key] / times["train"], cpu[key], cpu[key] / cpu["train"],
             cpu[(key, "ratio")], goal] for key, (label, goal) in what.items()]
    print_table(rows, ["what", "seconds", "x training", "CPU seconds", "x training (CPU)",
                       "x training (CPU, median of rounds)", "goal"],
                title=f"MLP 64-256-256-10, {n} digits, {epochs} epochs ({steps} SGD steps), "
                      f"test accuracy {acc:.3f}; projected vs lean scores: mean Spearman {rho:.3f}; "
                      f"lean 'mean' vs mean of the lean rows: relative difference {mean_err:.1e}; "
                      f"median of {args.repeats}, interleaved; load average {os.getloadavg()[0]:.1f} at the end")
    tr = np.asarray(rounds["train"])
    print_table([[label] + [f"{r:.2f}" for r in np.asarray(rounds[key]) / tr]
                 for key, (label, _) in what.items() if key != "train"],
                ["what"] + [f"round {i + 1}" for i in range(len(tr))],
                title="Every round: wall seconds over the same round's training "
                      f"(training {', '.join(f'{t:.3f}' for t in tr)} s)")


def part_lean(args):
    X, y = load_digits_data()
    n = 300 if args.quick else 1500
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:n + 100], y[n:n + 100]
    epochs = 2 if args.quick else args.epochs

    def train():
        return _recipe(make_mlp(), epochs, callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)

    rec = train().callbacks_[0]

    def lean(**kw):
        return HYDRA(_recipe(make_mlp(), epochs), mode="lean", trajectory=rec, **kw).fit(
            Xtr, ytr, X_target=Xte, y_target=yte)

    variants = {"none": {}, "mean": dict(target_reduction="mean"),
                "none, no self-influence": dict(lean_self_influence=False),
                "mean, no self-influence": dict(target_reduction="mean", lean_self_influence=False)}
    runs = {"train": train, **{k: (lambda kw=kw: lean(**kw)) for k, kw in variants.items()}}
    cs = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(max(1, args.repeats)):
        for k, fn in runs.items():
            c0 = time.process_time()
            fn()
            cs[k].append(time.process_time() - c0)
    tr = np.asarray(cs["train"])
    rows = []
    for k in variants:
        r = np.asarray(cs[k]) / tr
        rows.append([k, float(np.median(cs[k])), float(np.median(r)), int(np.sum(r <= 1.5)),
                     " ".join(f"{v:.2f}" for v in r)])
    print_table(rows, ["lean replay (target_reduction, self-influence)", "CPU s",
                       "x training (CPU, median of rounds)", "rounds <= 1.5", "every round"],
                title=f"Lean replays, {len(Xte)} targets, {n} digits, {epochs} epochs; training CPU "
                      f"median {np.median(tr):.3f} s; {args.repeats} rounds; load average "
                      f"{os.getloadavg()[0]:.1f} at the end")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def part_error(args):
    X, y = load_digits_data()
    X = X.astype(np.float64)
    n = 100 if args.quick else 200
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[1000:1100], y[1000:1100]
    lens = (1, 2, 4) if args.quick else (1, 2, 4, 8, 16)
    for lr in args.error_lrs:
        rows = []
        for ep in lens:
            def model(ep=ep, lr=lr):
                return TorchModel(_tiny(), epochs=ep, batch_size=32, lr=lr, momentum=0.9, weight_decay=1e-3,
                                  lr_schedule="cosine", dtype="float64", device="cpu", random_state=0)

            ex = HYDRA(model(), hessian="exact").fit(Xtr, ytr)
            Se = ex.attribute(Xte, yte)
            row = [ep, len(ex.trajectory_.batches_)]
            for h in ("none", "gauss-newton"):
                e = HYDRA(model(), hessian=h).fit(Xtr, ytr)
                D, De = e.hypergradients_, ex.hypergradients_
                rel = np.linalg.norm(D - De) / np.linalg.norm(De)
                ratio = np.linalg.norm(D) / np.linalg.norm(De)
                cos = np.mean(np.sum(D * De, 1) / (np.linalg.norm(D, axis=1) * np.linalg.norm(De, axis=1)))
                S = e.attribute(Xte, yte)
                srel = np.linalg.norm(S - Se) / np.linalg.norm(Se)
                rho = np.mean([spearmanr(a, b)[0] for a, b in zip(S, Se)])
                row += [rel, ratio, cos, srel, rho]
            rows.append(row)
        print_table(rows, ["epochs", "steps",
                           "HF rel. err d", "HF norm ratio", "HF mean cos d", "HF rel. err scores",
                           "HF Spearman scores",
                           "GN rel. err d", "GN norm ratio", "GN mean cos d", "GN rel. err scores",
                           "GN Spearman scores"],
                    title=f"Hessian-free (HF) and Gauss-Newton (GN) vs exact: MLP 64-16-10 (1,210 params), "
                          f"{n} digits, batch 32, lr {lr} cosine, momentum 0.9, wd 1e-3, 100 test points "
                          "(norm ratio: |d| / |d_exact| over all examples)")


def part_exactness(args):
    """Max relative error per example of HYDRA's recursion against autograd through the unrolled
    run (the reference of tests/test_hydra.py), for each curvature option."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import test_hydra as th

    rows = []
    for n, epochs in ((24, 6), (21, 3)):
        X, y = th._data(n)
        _, rec = th._recorded(X, y, epochs=epochs)
        for h in ("exact", "gauss-newton", "none"):
            ref = th._unrolled_jacobian(th._net(), rec, X, y, h).T.numpy()
            D = HYDRA(th._model(epochs=epochs), hessian=h).fit(X, y).hypergradients_
            err = max(np.linalg.norm(D[i] - ref[i]) / np.linalg.norm(ref[i]) for i in range(n))
            rows.append([f"{n} examples, {len(rec.batches_)} steps", h, err])
        ref = th._unrolled_jacobian(th._net(), rec, X, y, "exact").T.numpy()
        for h in ("gauss-newton", "none"):
            D = HYDRA(th._model(epochs=epochs), hessian=h).fit(X, y).hypergradients_
            rows.append([f"{n} examples, {len(rec.batches_)} steps", f"{h} vs exact autograd",
                         float(np.linalg.norm(D - ref) / np.linalg.norm(ref))])
    print_table(rows, ["run (MLP 4-5-3 float64, SGD mom 0.9, wd 0.05, cosine lr)", "hessian",
                       "max rel. error vs autograd of the same variant"],
                title="Exactness against autograd through the unrolled training")
    X, y = th._data(24)
    Xq, yq = th._data(6, seed=4)
    full = HYDRA(th._model()).fit(X, y)
    S = full.attribute(Xq, yq)
    lean = HYDRA(th._model(), mode="lean").fit(X, y, X_target=Xq, y_target=yq)
    rows = [["lean vs vector (scores)", float(np.abs(lean.attribute(None) - S).max() / np.abs(S).max())],
            ["lean vs vector (self-influence)",
             float(np.abs(lean.self_influence() - full.self_influence()).max() / np.abs(full.self_influence()).max())]]
    for k in (16, 64, 256, 1024, 4096):
        errs = []
        for seed in range(5):
            Sp = HYDRA(th._model(), projection_dim=k, random_state=seed).fit(X, y).attribute(Xq, yq)
            errs.append(np.linalg.norm(Sp - S) / np.linalg.norm(S))
        rows.append([f"projection_dim={k} vs full vectors (scores, mean of 5 seeds)", float(np.mean(errs))])
    print_table(rows, ["comparison (same tiny run, 6 targets)", "relative error"],
                title="Lean and projected HYDRA against the full-vector recursion")


def part_ab(args):
    import importlib
    import tempfile

    import skattr

    if not args.old:
        raise SystemExit("--part ab needs --old DIR (a checkout of the tree to compare with)")
    link_dir = tempfile.mkdtemp()
    os.symlink(os.path.join(os.path.abspath(args.old), "skattr"), os.path.join(link_dir, "skattr_old"))
    sys.path.insert(0, link_dir)
    old = importlib.import_module("skattr_old")
    HO = importlib.import_module("skattr_old.estimators.hydra").HYDRA
    X, y = load_digits_data()
    n = 1500
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:n + 100], y[n:n + 100]
    runs = {}
    for tag, pkg, H in (("old", old, HO), ("new", skattr, HYDRA)):
        def recipe(pkg=pkg, **kw):
            return pkg.TorchModel(make_mlp(), epochs=args.epochs, batch_size=64, lr=0.05, momentum=0.9,
                                  weight_decay=5e-4, lr_schedule="cosine", device="cpu", random_state=0, **kw)

        def train(pkg=pkg, recipe=recipe):
            return recipe(callbacks=[pkg.TrajectoryRecorder()]).fit(Xtr, ytr)

        rec = train().callbacks_[0]
        runs[f"train {tag}"] = train
        runs[f"proj {tag}"] = lambda H=H, recipe=recipe: H(recipe(), projection_dim=1024).fit(Xtr, ytr)
        runs[f"lean {tag}"] = lambda H=H, recipe=recipe, rec=rec: H(recipe(), mode="lean", trajectory=rec).fit(
            Xtr, ytr, X_target=Xte, y_target=yte)
    times, outs = _interleaved(runs, args.repeats)
    for w in ("proj", "lean"):
        a, b = outs[f"{w} old"], outs[f"{w} new"]
        A, B = (a.attribute(None), b.attribute(None)) if w == "lean" else (a.attribute(Xte, yte), b.attribute(Xte, yte))
        sa, sb = a.self_influence(), b.self_influence()
        print(f"{w}: max |new - old| / max |old|: scores {np.abs(A - B).max() / np.abs(A).max():.2e}, "
              f"self-influence {np.abs(sa - sb).max() / np.abs(sa).max():.2e}")
    rows = [[tag, times[f"train {tag}"], times[f"proj {tag}"], times[f"lean {tag}"],
             times[f"proj {tag}"] / times[f"train {tag}"], times[f"lean {tag}"] / times[f"train {tag}"]]
            for tag in ("old", "new")]
    print_table(rows, ["tree", "training s", "projected k=1024 s", "lean s", "projected / training",
                       "lean / training"], title=f"A/B in one process, median of {args.repeats}")


def main():
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--part", choices=["speed", "lean", "error", "exactness", "ab", "all"],
                    default="all")
    ap.add_argument("--old", default=None, help="--part ab: an older checkout to compare with")
    ap.add_argument("--error-lrs", type=float, nargs="+", default=[0.2, 0.05],
                    help="peak learning rates of the error table's runs")
    ap.set_defaults(epochs=10)
    args = ap.parse_args()
    setup(args, "HYDRA")
    if args.part in ("speed", "all"):
        part_speed(args)
    if args.part in ("error", "all"):
        part_error(args)
    if args.part in ("exactness", "all"):
        part_exactness(args)
    if args.part == "ab":
        part_ab(args)
    if args.part == "lean":
        part_lean(args)


if __name__ == "__main__":
    main()
