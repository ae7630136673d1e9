"""Noisy-label detection on digits: HYDRA vs TracIn vs TRAK vs influence functions vs the loss.

A fraction of the 1,500 digits training labels is flipped (to a uniformly drawn other class);
the MLP 64-256-256-10 is trained on the noisy set (SGD, momentum 0.9, weight decay 5e-4, cosine
learning rate, batch 64, 10 epochs) with a ``TrajectoryRecorder``; each method ranks the
training examples by a per-example score (higher = more suspicious):

* ``loss``: the per-example training loss at the trained network;
* ``HYDRA k=1024``: ``HYDRA(trajectory=recorder, projection_dim=1024).self_influence()``;
* ``HYDRA lean``: the lean replay's exact self-influence ``-grad l_i(theta_T) . d_i``;
* ``TracIn k=1024``: ``TracIn(checkpoints=recorder, projection_dim=1024).self_influence()``
  (the epoch checkpoints);
* ``TRAK-1 k=1024``: TRAK's self-influence on the trained network (loss output);
* ``IF EK-FAC``: ``InfluenceFunction(solver="ekfac", damping=0.1).self_influence()``.

Reported per method: detection ROC AUC and precision / recall after inspecting 10 % of the
training set (``skattr.metrics``), the test accuracy of the network retrained (shared harness
``skattr.ensemble.train_models``, same recipe and seed) without the method's top suspects (as
many as labels were flipped) next to retraining without as many random examples, mean +- std
over seeds (the seed sets the flips, the initialisation and the batch order), and the time of
each method.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/noisy_labels.py                 # 10 %, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/noisy_labels.py --noise 0.2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import load_digits_data, make_mlp, print_table  # noqa: E402

from skattr import TorchModel, TrajectoryRecorder  # noqa: E402
from skattr.ensemble import train_models  # noqa: E402
from skattr.estimators import TRAK, TracIn  # noqa: E402
from skattr.estimators.hydra import HYDRA  # noqa: E402
from skattr.metrics import mislabel_detection_auc, precision_at_fraction, recall_at_fraction  # noqa: E402


def _recipe(seed, epochs, **kw):
    return TorchModel(make_mlp(seed), epochs=epochs, batch_size=64, lr=0.05, momentum=0.9,
                      weight_decay=5e-4, lr_schedule="cosine", device="cpu", random_state=seed, **kw)


def run_seed(seed, noise, n, epochs, k):
    X, y = load_digits_data()
    Xtr, ytr, Xte, yte = X[:n], y[:n].copy(), X[n:], y[n:]
    rng = np.random.default_rng(seed)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(noise * n)), replace=False)] = True
    ytr[flipped] = (ytr[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    model = _recipe(seed, epochs, callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)
    rec = model.callbacks_[0]
    acc = float(model.score(Xte, yte))

    def loss():
        with torch.no_grad():
            z = model.logits(Xtr)
            return model.loss_fn(z, model.encode_y(ytr, n)).cpu().numpy()

    methods = {
        "loss": loss,
        f"HYDRA k={k}": lambda: HYDRA(_recipe(seed, epochs), projection_dim=k, trajectory=rec).fit(
            Xtr, ytr).self_influence(),
        "HYDRA lean": lambda: HYDRA(_recipe(seed, epochs), mode="lean", trajectory=rec).fit(
            Xtr, ytr, X_target=Xte[:10], y_target=yte[:10]).self_influence(),
        f"TracIn k={k}": lambda: TracIn(model, checkpoints=rec, projection_dim=k, output="loss").fit(
            Xtr, ytr).self_influence(),
        f"TRAK-1 k={k}": lambda: TRAK(model, models=[model], projection_dim=k, output="loss").fit(
            Xtr, ytr).self_influence(),
    }
    try:
        from skattr.estimators.influence import InfluenceFunction

        methods["IF EK-FAC (damping 0.1)"] = lambda: InfluenceFunction(
            model, solver="ekfac", damping=0.1).fit(Xtr, ytr).self_influence()
    except ImportError:  # pragma: no cover
        pass
    out, ranks = {}, {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        s = np.asarray(fn(), dtype=np.float64)
        dt = time.perf_counter() - t0
        ranks[name] = np.argsort(-s, kind="stable")
        out[name] = (mislabel_detection_auc(s, flipped), precision_at_fraction(s, flipped, 0.1),
                     recall_at_fraction(s, flipped, 0.1), dt)
        print(f"  seed {seed} {name}: AUC {out[name][0]:.3f}  P@10% {out[name][1]:.3f}  "
              f"R@10% {out[name][2]:.3f}  ({dt:.1f} s)", flush=True)
    # retrain (the shared harness, same recipe and seed) without the top-q suspects of each
    # method, q = the fraction flipped, vs without q random examples
    q = int(round(noise * n))
    subsets = {name: np.sort(r[q:]) for name, r in ranks.items()}
    subsets["random"] = np.sort(rng.permutation(n)[q:])
    subsets["all (noisy)"] = np.arange(n)
    names = list(subsets)
    models = train_models(_recipe(seed, epochs), Xtr, ytr, [subsets[k_] for k_ in names], [seed] * len(names))
    retrain = {name: float(m.score(Xte, yte)) for name, m in zip(names, models)}
    print(f"  seed {seed} retrained test accuracy: "
          + ", ".join(f"{k_} {v:.3f}" for k_, v in retrain.items()), flush=True)
    return out, acc, retrain


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"== noisy labels: digits MLP 64-256-256-10, {args.n_train} train, {args.noise:.0%} flipped, "
          f"{args.epochs} epochs, seeds {args.seeds} | torch {torch.__version__} ==")
    res, accs, ret = {}, [], {}
    for s in args.seeds:
        out, acc, retrain = run_seed(s, args.noise, args.n_train, args.epochs, args.k)
        accs.append(acc)
        for name, v in out.items():
            res.setdefault(name, []).append(v)
        for name, v in retrain.items():
            ret.setdefault(name, []).append(v)
    rows = []
    for name, vs in res.items():
        v = np.asarray(vs)
        m, sd = v.mean(0), v.std(0)
        r = np.asarray(ret[name])
        rows.append([name, f"{m[0]:.3f} ± {sd[0]:.3f}", f"{m[1]:.3f} ± {sd[1]:.3f}",
                     f"{m[2]:.3f} ± {sd[2]:.3f}", f"{r.mean():.3f} ± {r.std():.3f}", f"{m[3]:.1f}"])
    for name in ("random", "all (noisy)"):
        r = np.asarray(ret[name])
        rows.append([f"({name})", "-", "-", "-", f"{r.mean():.3f} ± {r.std():.3f}", "-"])
    print_table(rows, ["method", "AUC", "precision @10%", "recall @10%",
                       f"test acc. retrained without top {args.noise:.0%}", "seconds"],
                title=f"{args.noise:.0%} flipped labels, {len(args.seeds)} seeds; test accuracy of the "
                      f"noisy-trained network {np.mean(accs):.3f} ± {np.std(accs):.3f}")


if __name__ == "__main__":
    main()
