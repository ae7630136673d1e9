"""Noisy-label detection on digits: HYDRA vs TracIn vs TRAK vs influence functions vs baselines.

A fraction of the digits training labels is flipped (to a uniformly drawn other class); the
network (``--arch mlp``: MLP 64-256-256-10; ``--arch cnn``: the small CNN of
``benchmarks/common.py``, 25,290 parameters) is trained on the noisy set (SGD, momentum 0.9,
weight decay 5e-4, cosine learning rate, batch 64) with a ``TrajectoryRecorder``; each method
ranks the training examples by a per-example score (higher = more suspicious):

* ``loss``: the per-example training loss at the trained network;
* ``grad norm^2``: ``|grad l_i(theta_T)|^2`` (self-influence with the identity metric);
* ``Grad-Cos``: minus the mean cosine between ``grad l_i`` and the loss gradients of the other
  training examples with the same (given) label;
* ``HYDRA k=..``: ``HYDRA(trajectory=recorder, projection_dim=k).self_influence()``;
* ``HYDRA lean``: the lean replay's exact self-influence ``-grad l_i(theta_T) . d_i``;
* ``TracIn k=..``: ``TracIn(checkpoints=recorder, projection_dim=k).self_influence()``;
* ``TRAK-1 k=..``: TRAK's self-influence on the trained network (loss output);
* ``IF <solver>``: ``InfluenceFunction(solver=..., damping=0.1).self_influence()``; EK-FAC on
  every parameter; CG, LiSSA (and EK-FAC again, to compare like with like) on the last layer's
  parameters only (``params=<last layer>``): their self-influence solves one system per
  training example, ``n_train^2`` example-HVPs per iteration, which every parameter makes too
  slow on this machine (``--if-all-params`` runs them on every parameter).  ``exact`` does not
  fit (a 20,490^2 Hessian at least);
* ``loss-kernel variance``: the variance of each example's loss under local SGLD
  (``LossKernel(kind="covariance").variance_``);
* ``random``: a seeded random score (chance: precision = the flipped fraction).

Reported per method: detection ROC AUC and precision / recall after inspecting 10 % of the
training set (``skattr.metrics``), mean +- std over seeds (the seed sets the flips, the
initialisation and the batch order), and the time of each method.  Then
``skattr.metrics.retrain_without_suspects`` for the per-example loss and the best attribution
method by mean precision (``--retrain top``; ``all``: every method; ``none``): the test
accuracy of the network retrained (same recipe and seed) without its top-``k`` suspects vs
without ``k`` random examples, ``k`` = half and all of the number flipped.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/noisy_labels.py                   # MLP, 10 %, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/noisy_labels.py --arch cnn --n-train 500
    OMP_NUM_THREADS=1 python benchmarks/noisy_labels.py --noise 0.2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import load_digits_data, make_cnn, make_mlp, print_table  # noqa: E402

from skattr import TorchModel, TrajectoryRecorder  # noqa: E402
from skattr.estimators import TRAK, InfluenceFunction, LossKernel, TracIn  # noqa: E402
from skattr.estimators.hydra import HYDRA  # noqa: E402
from skattr.metrics import (  # noqa: E402
    mislabel_detection_auc,
    precision_at_fraction,
    recall_at_fraction,
    retrain_without_suspects,
)

NETS = {"mlp": make_mlp, "cnn": make_cnn}
BASELINES = ("loss", "grad norm^2", "Grad-Cos", "random", "loss-kernel variance")


def _recipe(arch, seed, epochs, **kw):
    return TorchModel(NETS[arch](seed), epochs=epochs, batch_size=64, lr=0.05, momentum=0.9,
                      weight_decay=5e-4, lr_schedule="cosine", device="cpu", random_state=seed, **kw)


def _last_layer(model):
    """The module prefix of the network's last parameter (its output layer)."""
    return [name for name, _ in model.network().named_parameters()][-1].rsplit(".", 1)[0]


def _noisy_split(seed, noise, n):
    X, y = load_digits_data()
    Xtr, ytr, Xte, yte = X[:n], y[:n].copy(), X[1500:], y[1500:]
    rng = np.random.default_rng(seed)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(noise * n)), replace=False)] = True
    ytr[flipped] = (ytr[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    return Xtr, ytr, Xte, yte, flipped


def method_scores(args, seed, model, rec, Xtr, ytr, Xte, yte):
    """Each method's scoring function (higher = more suspicious)."""
    arch, epochs, k = args.arch, args.epochs, args.k
    n = Xtr.shape[0]
    last = _last_layer(model)
    G = {}

    def grads():
        if "G" not in G:
            G["G"] = torch.as_tensor(model.per_example_gradients(Xtr, ytr), dtype=torch.float64)
        return G["G"]

    def loss():
        return model.per_example_loss(Xtr, ytr)

    def grad_cos():
        Gn = torch.nn.functional.normalize(grads(), dim=1)
        out = np.empty(n)
        for c in np.unique(ytr):
            idx = np.flatnonzero(ytr == c)
            S = Gn[idx] @ Gn[idx].sum(0)  # sum of cosines with the class, itself included (1)
            out[idx] = -((S - 1.0) / max(1, len(idx) - 1)).numpy()
        return out

    def influence(solver, all_params, **kw):
        def run():
            m = model
            if not all_params:
                m = copy.deepcopy(model).set_params(params=last)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = InfluenceFunction(m, solver=solver, damping=0.1, random_state=seed, **kw).fit(
                    Xtr, ytr).self_influence()
            for w in {str(w.message)[:160] for w in caught}:
                print(f"    warning ({solver}): {w}", flush=True)
            return s
        return run

    methods = {
        "loss": loss,
        "grad norm^2": lambda: (grads() ** 2).sum(1).numpy(),
        "Grad-Cos": grad_cos,
        "random": lambda: np.random.default_rng([seed, 99]).random(n),
        f"HYDRA k={k}": lambda: HYDRA(_recipe(arch, seed, epochs), projection_dim=k, trajectory=rec).fit(
            Xtr, ytr).self_influence(),
        "HYDRA lean": lambda: HYDRA(_recipe(arch, seed, epochs), mode="lean", trajectory=rec).fit(
            Xtr, ytr, X_target=Xte[:10], y_target=yte[:10]).self_influence(),
        f"TracIn k={k}": lambda: TracIn(model, checkpoints=rec, projection_dim=k, output="loss").fit(
            Xtr, ytr).self_influence(),
        f"TRAK-1 k={k}": lambda: TRAK(model, models=[model], projection_dim=k, output="loss").fit(
            Xtr, ytr).self_influence(),
        "IF EK-FAC": influence("ekfac", True),
    }
    where = "" if args.if_all_params else " (last layer)"
    if not args.if_all_params:
        methods["IF EK-FAC (last layer)"] = influence("ekfac", False)
    if "cg" in args.solvers:
        methods[f"IF CG{where}, {args.cg_iter} it."] = influence(
            "cg", args.if_all_params, n_iter=args.cg_iter, tol=1e-3)
    if "lissa" in args.solvers:
        methods[f"IF LiSSA{where}, {args.lissa_iter} x {args.lissa_batch}"] = influence(
            "lissa", args.if_all_params, n_iter=args.lissa_iter, lissa_batch_size=args.lissa_batch)
    if args.loss_kernel:
        methods["loss-kernel variance"] = lambda: LossKernel(
            model, n_chains=2, n_draws=args.lk_draws, kind="covariance", keep=None,
            step_size=args.lk_step if args.lk_step == "auto" else float(args.lk_step),
            random_state=seed).fit(Xtr, ytr).variance_
    return methods


def run_seed(args, seed):
    Xtr, ytr, Xte, yte, flipped = _noisy_split(seed, args.noise, args.n_train)
    model = _recipe(args.arch, seed, args.epochs, callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)
    rec = model.callbacks_[0]
    acc = float(model.score(Xte, yte))
    print(f"  seed {seed}: {flipped.sum()} flipped, test accuracy {acc:.3f}", flush=True)
    out, scores = {}, {}
    for name, fn in method_scores(args, seed, model, rec, Xtr, ytr, Xte, yte).items():
        t0 = time.perf_counter()
        s = np.asarray(fn(), dtype=np.float64)
        dt = time.perf_counter() - t0
        if not np.all(np.isfinite(s)):
            print(f"  seed {seed} {name}: non-finite scores, left out", flush=True)
            continue
        scores[name] = s
        out[name] = (mislabel_detection_auc(s, flipped), precision_at_fraction(s, flipped, 0.1),
                     recall_at_fraction(s, flipped, 0.1), dt)
        print(f"  seed {seed} {name}: AUC {out[name][0]:.3f}  P@10% {out[name][1]:.3f}  "
              f"R@10% {out[name][2]:.3f}  ({dt:.1f} s)", flush=True)
    return out, acc, scores, (Xtr, ytr, Xte, yte, flipped)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(NETS), default="mlp")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--solvers", nargs="*", default=["cg", "lissa"], choices=["cg", "lissa"],
                    help="iterative IF solvers to run besides EK-FAC")
    ap.add_argument("--if-all-params", action="store_true",
                    help="CG / LiSSA on every parameter instead of the last layer")
    ap.add_argument("--cg-iter", type=int, default=10)
    ap.add_argument("--lissa-iter", type=int, default=100)
    ap.add_argument("--lissa-batch", type=int, default=10)
    ap.add_argument("--no-loss-kernel", dest="loss_kernel", action="store_false")
    ap.add_argument("--lk-draws", type=int, default=100)
    ap.add_argument("--lk-step", default="auto", help='LossKernel step_size ("auto" calibrates)')
    ap.add_argument("--retrain", choices=["top", "all", "none"], default="top")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"== noisy labels: digits {args.arch}, {args.n_train} train, {args.noise:.0%} flipped, "
          f"{args.epochs} epochs, seeds {args.seeds} | torch {torch.__version__} ==", flush=True)
    res, accs, kept = {}, [], []
    for s in args.seeds:
        out, acc, scores, data = run_seed(args, s)
        accs.append(acc)
        kept.append((s, scores, data))
        for name, v in out.items():
            res.setdefault(name, []).append(v)
    rows = []
    for name, vs in res.items():
        v = np.asarray(vs)
        m, sd = v.mean(0), v.std(0)
        rows.append([name, f"{m[0]:.3f} ± {sd[0]:.3f}", f"{m[1]:.3f} ± {sd[1]:.3f}",
                     f"{m[2]:.3f} ± {sd[2]:.3f}", f"{m[3]:.1f}", str(len(vs))])
    print_table(rows, ["method", "AUC", "precision @10%", "recall @10%", "seconds", "seeds"],
                title=f"{args.arch}, {args.noise:.0%} flipped labels, {len(args.seeds)} seeds; test "
                      f"accuracy of the noisy-trained network {np.mean(accs):.3f} ± {np.std(accs):.3f}")
    if args.retrain == "none":
        return
    prec = {name: np.mean([v[1] for v in vs]) for name, vs in res.items() if len(vs) == len(args.seeds)}
    if args.retrain == "all":
        chosen = list(prec)
    else:
        best = max((p, name) for name, p in prec.items() if name not in BASELINES)[1]
        chosen = ["loss", best]
    q = int(round(args.noise * args.n_train))
    ks = [q // 2, q]
    table = {}
    for s, scores, (Xtr, ytr, Xte, yte, _) in kept:
        for name in chosen:
            r = retrain_without_suspects(_recipe(args.arch, s, args.epochs), Xtr, ytr, scores[name], ks,
                                         X_test=Xte, y_test=yte, random_state=s)
            table.setdefault(name, []).append(r)
            print(f"  seed {s} retrain without {name}'s top {ks}: acc {r['score_suspects'][:, 0]} vs "
                  f"random {r['score_random'][:, 0]} (all: {r['score_all'][0]:.3f})", flush=True)
    rows = []
    for name, rs in table.items():
        sus = np.stack([r["score_suspects"][:, 0] for r in rs])
        rnd = np.stack([r["score_random"][:, 0] for r in rs])
        fl = np.stack([[flipped_share(r, kept[i][2][4], c) for c in range(len(ks))]
                       for i, r in enumerate(rs)])
        row = [name]
        for c in range(len(ks)):
            row += [f"{fl[:, c].mean():.2f}", f"{sus[:, c].mean():.3f} ± {sus[:, c].std():.3f}",
                    f"{rnd[:, c].mean():.3f} ± {rnd[:, c].std():.3f}"]
        rows.append(row)
    alls = np.array([r["score_all"][0] for r in table[chosen[0]]])
    headers = ["method"]
    for kk in ks:
        headers += [f"flipped among top {kk}", f"acc. without top {kk}", f"acc. without {kk} random"]
    print_table(rows, headers, title=f"retrain_without_suspects (same recipe and seed); retrained on "
                                     f"everything: {alls.mean():.3f} ± {alls.std():.3f}")


def flipped_share(r, flipped, c):
    return float(flipped[r["removed"][c]].mean())


if __name__ == "__main__":
    main()
