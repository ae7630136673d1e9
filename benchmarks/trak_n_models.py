"""How many models TRAK needs on digits: TRAK-1, 2, 4, 8 against the single-model methods.

The digits LDS setup of ``benchmarks/attribution_comparison.py`` (1,000 training / 200 test
digits, MLP 64-128-128-10 and the small CNN, the same training recipe), reusing its caches read
only: the 50 models retrained on random halves (the LDS ground truth,
:class:`skattr.metrics.SubsetRetrainer`) and the 10 TRAK members trained on random halves.
Nothing is retrained except the full-data model (one fit, seconds).

For each row it prints

* ``median 1-p``: the median over the training set of TRAK's reweighting ``Q = 1 - p(true class)``
  (averaged over the models), what :class:`~skattr.SingleModelWarning` tests (below 0.01 with one
  model: the warning fires);
* ``same-label top-5``: the share of the 5 highest-scoring training digits whose label equals the
  test digit's, averaged over the test digits (chance: the label's share of the training set);
* ``top-5 with 1-p >= 0.01``: the share of those 5 proponents that the models do not fit with
  ``p > 0.99``, next to that share in the whole training set;
* the LDS against the 50 retrained models;
* for TRAK, the same two figures of its scores divided by the weights ``1 - p`` (what the
  weights do to the ranking);
* whether the fit raised :class:`~skattr.SingleModelWarning`, and its text.

TRAK-1 (full-data model) is the single network a user has; TRAK-M uses the first M members
(trained on random halves).  TracIn (the full-data model's 30 epoch checkpoints), influence
functions (EK-FAC) and HYDRA are the methods built for one model.

Usage::

    python benchmarks/trak_n_models.py                 # MLP and CNN
    python benchmarks/trak_n_models.py --archs mlp
    python benchmarks/trak_n_models.py --sweep        # the warning's threshold over training lengths
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from sklearn.base import clone

from skattr import SingleModelWarning, TrajectoryRecorder
from skattr.estimators import HYDRA, TRAK, TracIn
from skattr.estimators.influence import InfluenceFunction
from skattr.metrics import SubsetRetrainer
from skattr.reports.trak import digits_split, make_cnn, make_mlp, template

RESULTS = os.path.join("benchmarks", "results")
# the caches of benchmarks/attribution_comparison.py (its --out defaults for each architecture)
ARCHS = {
    "mlp": (lambda: make_mlp(128, 2), False, os.path.join(RESULTS, "attribution", "cache", "mlp")),
    "cnn": (make_cnn, True, os.path.join(RESULTS, "attribution_cnn", "cache", "cnn")),
}
FITTED = 0.01  # the threshold on 1 - p that SingleModelWarning uses


def _files(path):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def margin_without_weights(z, y):
    """The classification margin ``log(p_y / (1 - p_y))`` as a callable output: TRAK then uses
    ``Q = 1`` (no ``1 - p`` weights), with the same features as ``output="margin"``."""
    others = z.scatter(1, y[:, None], float("-inf"))
    return z.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, dim=1)


def top_k_stats(S, ytr, yte, k=5):
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return top, float(np.mean(ytr[top] == yte[:, None]))


def evaluate(name, est, ret, Xtr, ytr, Xte, yte, k=5, twin=None):
    """Fit ``est``, and measure its top-k proponents and LDS; return a row and the warning.
    ``twin``: the same TRAK without the 1 - p weights."""
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        est.fit(Xtr, ytr)
    single = [w for w in rec if issubclass(w.category, SingleModelWarning)]
    S = est.attribute(Xte, yte)
    top, same = top_k_stats(S, ytr, yte, k)
    row = {"method": name, "same_label": same, "lds": float(ret.score(S, Xte, yte)),
           "warned": len(single), "seconds": time.perf_counter() - t}
    if twin is not None:
        q = est.q_
        row["median_q"] = float(np.median(q))
        row["top_unfitted"] = float(np.mean(q[top] >= FITTED))
        row["base_unfitted"] = float(np.mean(q >= FITTED))
        # the same scores without TRAK's 1 - p weights: what the weights do to the ranking
        S0 = twin.fit(Xtr, ytr).attribute(Xte, yte)
        row["same_label_noq"] = top_k_stats(S0, ytr, yte, k)[1]
        row["lds_noq"] = float(ret.score(S0, Xte, yte))
    return row, (str(single[0].message) if single else None)


def table(rows):
    lines = ["| method | models | median 1-p | same-label top-5 | LDS | top-5 with 1-p >= 0.01 "
             "(training set) | without the 1-p weights: same-label, LDS | SingleModelWarning | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = "median_q" in r
        mq = f"{r['median_q']:.1e}" if q else "-"
        un = f"{r['top_unfitted']:.2f} ({r['base_unfitted']:.2f})" if q else "-"
        noq = f"{r['same_label_noq']:.3f}, {r['lds_noq']:.3f}" if q else "-"
        lines.append(f"| {r['method']} | {r['models']} | {mq} | {r['same_label']:.3f} | {r['lds']:.3f} | "
                     f"{un} | {noq} | {'yes' if r['warned'] else 'no'} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def run(arch, sizes, projection_dim, alternatives):
    make, images, cache = ARCHS[arch]
    Xtr, ytr, Xte, yte, _, _ = digits_split(images=images, n_train=1000, n_test=200)
    model = template(make(), epochs=30)
    before = _files(cache)
    # the same settings as skattr.reports.attribution.attribution_study, so both caches hit
    ret = SubsetRetrainer(model, n_subsets=50, cache_dir=cache, random_state=0).fit(Xtr, ytr)
    with tempfile.TemporaryDirectory() as tmp:
        # TRAK loads cached members from STORE/members: link the cache's there, so the members
        # are loaded (not retrained) and only the throw-away features (k = 8) go to tmp
        os.symlink(os.path.abspath(os.path.join(cache, "trak_members", "members")),
                   os.path.join(tmp, "members"))
        members = TRAK(model, n_models=10, projection_dim=8, store=tmp, random_state=1).fit(Xtr, ytr).models_
    if _files(cache) != before:
        raise RuntimeError(f"the cache under {cache} was incomplete: files were added; run "
                           "benchmarks/attribution_comparison.py first (it trains them).")
    full = clone(model).set_params(callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)
    chance = float(np.mean([np.mean(ytr == c) for c in yte]))
    print(f"\n{arch}: 1,000 training / 200 test digits; full-data model: train accuracy "
          f"{full.score(Xtr, ytr):.3f}, test accuracy {full.score(Xte, yte):.3f}; members (random "
          f"halves): test accuracy {np.mean([m.score(Xte, yte) for m in members[:max(sizes)]]):.3f}; "
          f"same-label chance level {chance:.3f}; projection_dim {projection_dim}", flush=True)
    rows, text = [], None
    specs = [("TRAK-1 (full-data model)", 1, TRAK(full, projection_dim=projection_dim, random_state=0))]
    specs += [(f"TRAK-{M} (members)", M, TRAK(model, models=members[:M], projection_dim=projection_dim,
                                               random_state=0)) for M in sizes]
    if alternatives:
        specs += [
            ("TracIn (30 checkpoints)", 1, TracIn(full)),
            ("IF (EK-FAC)", 1, InfluenceFunction(full, solver="ekfac", random_state=0)),
            ("HYDRA", 1, HYDRA(model, projection_dim=projection_dim, random_state=0)),
        ]
    for name, M, est in specs:
        twin = (clone(est).set_params(output=margin_without_weights) if isinstance(est, TRAK) else None)
        row, msg = evaluate(name, est, ret, Xtr, ytr, Xte, yte, twin=twin)
        row["models"] = M
        rows.append(row)
        text = text or msg
        print(f"  {name}: same-label {row['same_label']:.3f}, LDS {row['lds']:.3f}, "
              f"warned {row['warned']}, {row['seconds']:.1f} s", flush=True)
    print(f"\n{table(rows)}\n\nSingleModelWarning as printed (TRAK-1, full-data model):\n{text}", flush=True)
    if _files(cache) != before:
        raise RuntimeError(f"files were added under {cache}; the run was meant to read it only.")
    return rows


def sweep(projection_dim):
    """Where the warning's threshold lies: TRAK-1 and TRAK-4 over training lengths, on digits and
    on a differently built set (``make_classification``), no LDS (that needs retraining)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split
    from torch import nn

    def clf_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))

    Xd, yd, Xdt, ydt, _, _ = digits_split(n_train=1000, n_test=200)
    X, y = make_classification(n_samples=1200, n_features=20, n_informative=10, n_classes=3,
                               random_state=0)
    Xc, Xct, yc, yct = train_test_split(X.astype(np.float32), y, train_size=1000, random_state=0, stratify=y)
    cases = [("digits MLP 64-128-128-10", lambda: make_mlp(128, 2), Xd, yd, Xdt, ydt, (3, 5, 8, 12, 20, 30)),
             ("make_classification MLP 20-256-256-3", clf_mlp, Xc, yc, Xct, yct, (1, 3, 10, 30))]
    lines = ["| data, network | epochs | train acc. | median 1-p | share 1-p < 0.01 | SingleModelWarning "
             "| TRAK-1 same-label top-5 | TRAK-4 same-label top-5 | chance |", "|---|---|---|---|---|---|---|---|---|"]
    for name, make, Xtr, ytr, Xte, yte, epochs in cases:
        chance = float(np.mean([np.mean(ytr == c) for c in yte]))
        for ep in epochs:
            model = template(make(), epochs=ep)
            full = clone(model).fit(Xtr, ytr)
            one = TRAK(full, projection_dim=projection_dim, random_state=0)
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                one.fit(Xtr, ytr)
            warned = any(issubclass(w.category, SingleModelWarning) for w in rec)
            four = TRAK(model, n_models=4, projection_dim=projection_dim, random_state=1).fit(Xtr, ytr)
            q = one.q_
            line = (f"| {name} | {ep} | {full.score(Xtr, ytr):.3f} | {np.median(q):.1e} | "
                    f"{np.mean(q < FITTED):.2f} | {'yes' if warned else 'no'} | "
                    f"{top_k_stats(one.attribute(Xte, yte), ytr, yte)[1]:.3f} | "
                    f"{top_k_stats(four.attribute(Xte, yte), ytr, yte)[1]:.3f} | {chance:.3f} |")
            lines.append(line)
            print(line, flush=True)
    print("\n" + "\n".join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=list(ARCHS))
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--projection-dim", type=int, default=2048)
    p.add_argument("--no-alternatives", action="store_true",
                   help="leave out TracIn, influence functions and HYDRA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", action="store_true",
                   help="instead: TRAK-1 / TRAK-4 over training lengths on digits and make_classification")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args.projection_dim)
    for arch in args.archs:
        run(arch, args.sizes, args.projection_dim, not args.no_alternatives)


if __name__ == "__main__":
    main()
