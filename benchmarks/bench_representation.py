"""Representation tracing (issue 12): recording overhead, storage and the error of approximations.

MLP 64-256-256-10 (and the small CNN of ``common.make_cnn``) on digits, plain SGD (momentum 0),
float32, batch 64, lr 0.1, ``--epochs`` epochs (default 5):

* speed: ``TorchModel.fit`` (plain training) against the same fit with the
  :class:`~skattr.tracing.RepresentationRecorder` callback (training + recording), and against
  ``RepresentationTracer.fit`` as a whole (recording, stacking the records, the exactness check);
  medians of ``--repeats`` runs after a warm-up, one process;
* storage and error: bytes per (example, step) of the records for exact factors, projected
  factors (``projection_dim``), step sub-sampling (``step_every``) and whole-step updates
  (``record="updates"``), each with the error it costs against the exact decomposition:
  ``weight residual`` = ``||W_T - W_0 - sum dW|| / ||W_T - W_0||`` (max over layers),
  the relative Frobenius error of the influence matrix (test x train, layers summed), the mean
  per-test-point Pearson correlation with the exact scores and the overlap of the top-10.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_representation.py            # 1,500 train, 200 test
    OMP_NUM_THREADS=1 python benchmarks/bench_representation.py --quick
    OMP_NUM_THREADS=1 python benchmarks/bench_representation.py --class-agreement   # only that table
    OMP_NUM_THREADS=1 python benchmarks/bench_representation.py --class-ablation    # why, on digits
    OMP_NUM_THREADS=1 python benchmarks/bench_representation.py --store --epochs 20  # memory vs disk

``--class-agreement``: on digits (1,000 train / 300 test) and a differently built synthetic set
(``make_classification``: 8 classes of two Gaussian clusters, signed standardised features;
1,000 train / 300 test), MLPs and CNNs with biases and in the paper's form (bias-free layers,
batch norm without affine parameters before each ReLU): the share of each test point's top-10
proponents in its class per traced layer and layers summed, the majority / all-ten shares of the
last layer (all test points, the correctly classified ones, and against the predicted class),
and how often the class with the largest summed influence is the test point's own; 10 nearest
neighbours in input space as a reference.  Three rows train with the paper's mini-batch variant
(``batch_mode="classwise"``, 8 ghosts in batches of 32).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from sklearn.base import clone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    add_common_args,
    load_digits_data,
    make_cnn,
    make_mlp,
    print_table,
    setup,
    time_call,
)

from skattr import TorchModel  # noqa: E402
from skattr.estimators.representation import RepresentationTracer  # noqa: E402
from skattr.tracing import RepresentationRecorder  # noqa: E402


def _errors(S, S0, k=10):
    rel = float(np.linalg.norm(S - S0) / np.linalg.norm(S0))
    corr = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(S, S0)]))
    t0 = np.argsort(-S0, 1)[:, :k]
    t1 = np.argsort(-S, 1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(t0, t1)]))
    return rel, corr, overlap


def _mlp(hidden, norm, seed=0, d_in=64, n_classes=10):
    """MLP with ReLU; ``norm``: the paper's VGG form (bias-free Linear + BatchNorm1d without
    affine parameters before each ReLU) or plain Linear layers with biases."""
    from torch import nn

    torch.manual_seed(seed)
    dims, layers = (d_in, *hidden), []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += ([nn.Linear(a, b, bias=False), nn.BatchNorm1d(b, affine=False)] if norm
                   else [nn.Linear(a, b)]) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], n_classes, bias=not norm))


def _cnn(norm, seed=0):
    """Conv 1-16-32 (3x3) with 2x2 max pooling on 8x8 digits, Linear 128->10; ``norm``: bias-free
    convolutions + BatchNorm2d without affine (the paper's VGG blocks)."""
    from torch import nn

    torch.manual_seed(seed)

    def block(a, b):
        return ([nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b, affine=False)] if norm
                else [nn.Conv2d(a, b, 3, padding=1)]) + [nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), *block(1, 16), *block(16, 32), nn.Flatten(),
                         nn.Linear(128, 10, bias=not norm))


def _synthetic():
    """A differently built set: 8 classes of 2 Gaussian clusters each at hypercube vertices in 16
    informative + 8 redundant + 8 noise dimensions (sklearn ``make_classification``), signed,
    standardised features; 1,300 samples."""
    from sklearn.datasets import make_classification
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification(n_samples=1300, n_features=32, n_informative=16, n_redundant=8,
                               n_classes=8, n_clusters_per_class=2, class_sep=3.0, random_state=0)
    return StandardScaler().fit_transform(X).astype("float32"), y


def _shares(S, ytr, yte, k=10):
    same = ytr[np.argsort(-S, 1)[:, :k]] == yte[:, None]
    return same.mean(), (same.mean(1) > 0.5).mean(), same.all(1).mean()


def _last_input(tr, X):
    """The input of the last traced layer under the final network (numpy, one row per sample)."""
    net = tr.model_.network()
    mod = dict(net.named_modules())[tr.layers_[-1]]
    got = []
    h = mod.register_forward_hook(lambda m, i, o: got.append(i[0].detach().flatten(1)))
    with torch.no_grad():
        net.eval()(tr.model_.to_tensor(X))
    h.remove()
    return torch.cat(got).double().numpy()


def class_agreement(epochs=10):
    """For each network: the share of each test point's top-10 proponents (paper's influence,
    ``sum_t ||c|| cos``) in its class, per traced layer and layers summed; the last layer with
    the share of test points whose top-10 have a majority / all ten in the class; and how often
    the class with the largest summed influence is the test point's own."""
    from sklearn.metrics import pairwise_distances

    X, y = load_digits_data()
    Xs, ys = _synthetic()
    sets = {"digits": (X[:1000], y[:1000], X[1000:1300], y[1000:1300]),
            "synthetic": (Xs[:1000], ys[:1000], Xs[1000:], ys[1000:])}
    nets = [
        ("digits", "MLP 64-64-10, biases", lambda: _mlp((64,), False)),
        ("digits", "MLP 64-256-256-10, biases", lambda: _mlp((256, 256), False)),
        ("digits", "MLP 64-64-10, BN", lambda: _mlp((64,), True)),
        ("digits", "MLP 64-64-64-10, BN", lambda: _mlp((64, 64), True)),
        ("digits", "CNN 16-32, biases", lambda: _cnn(False)),
        ("digits", "CNN 16-32, BN", lambda: _cnn(True)),
        ("digits", "MLP 64-64-10, BN, classwise + 8 ghosts", lambda: _mlp((64,), True), {"ghost": 8}),
        ("digits", "CNN 16-32, BN, classwise + 8 ghosts", lambda: _cnn(True), {"ghost": 8}),
        ("synthetic", "MLP 32-64-8, biases", lambda: _mlp((64,), False, d_in=32, n_classes=8)),
        ("synthetic", "MLP 32-64-64-8, biases", lambda: _mlp((64, 64), False, d_in=32, n_classes=8)),
        ("synthetic", "MLP 32-64-8, BN", lambda: _mlp((64,), True, d_in=32, n_classes=8)),
        ("synthetic", "MLP 32-64-64-8, BN", lambda: _mlp((64, 64), True, d_in=32, n_classes=8)),
        ("synthetic", "MLP 32-64-8, BN, classwise + 8 ghosts", lambda: _mlp((64,), True, d_in=32, n_classes=8),
         {"ghost": 8}),
    ]
    rows = []
    for data in sets:
        Xtr, ytr, Xte, yte = sets[data]
        m, maj, al = _shares(-pairwise_distances(Xte, Xtr), ytr, yte)
        rows.append([data, "10 nearest neighbours (input space)", "", "", f"{m:.3f}", f"{maj:.3f}",
                     f"{al:.3f}", "", "", "", "", ""])
        for d, name, make, *kw in nets:
            if d != data:
                continue
            model = TorchModel(make(), epochs=epochs, lr=0.1, momentum=0.0, batch_size=32, random_state=0)
            kw = {"batch_mode": "classwise", **kw[0]} if kw else {}
            tr = RepresentationTracer(model, **kw).fit(Xtr, ytr)
            per = {n: tr.attribute(Xte, layer=n) for n in tr.layers_}
            last = per[tr.layers_[-1]]
            m, maj, al = _shares(last, ytr, yte)
            pred = tr.model_.predict(Xte)
            ok = pred == yte
            classes = np.unique(ytr)
            by_class = np.stack([last[:, ytr == c].sum(1) for c in classes], 1)
            own = float((classes[by_class.argmax(1)] == yte).mean())
            A_tr, A_te = _last_input(tr, Xtr), _last_input(tr, Xte)
            cos_a = (A_te / np.linalg.norm(A_te, axis=1, keepdims=True)) @ (
                A_tr / np.linalg.norm(A_tr, axis=1, keepdims=True)).T
            other = cos_a[yte[:, None] != ytr[None, :]].mean()
            rows.append([data, name, f"{tr.model_.score(Xte, yte):.3f}",
                         " / ".join(f"{_shares(S, ytr, yte)[0]:.2f}" for S in per.values()),
                         f"{m:.3f}", f"{maj:.3f}", f"{al:.3f}", f"{_shares(last[ok], ytr, yte[ok])[0]:.3f}",
                         f"{_shares(last, ytr, pred)[0]:.3f}", f"{_shares(sum(per.values()), ytr, yte)[0]:.3f}",
                         f"{own:.3f}", f"{other:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print_table(rows, ["data", "network", "test acc", "top-10 share per layer (first ... last)",
                       "last layer: top-10 share", "majority", "all 10", "correctly classified only",
                       "share in the predicted class", "layers summed: share",
                       "own class has the largest summed influence (last layer)",
                       "mean cos(a_i, a(x)) at the last layer's input, other-class pairs"],
                title=f"Class agreement of the top-10 proponents ({epochs} epochs, lr 0.1, batch 32, "
                      "plain SGD, 1,000 train, float32)")


def class_ablation(epochs=10):
    """Digits, MLP 64-64-10, last layer: the top-10 share by training epochs (which steps' updates
    are ranked) and by architecture (biases, batch norm, layer norm)."""
    from torch import nn

    X, y = load_digits_data()
    Xtr, ytr, Xte, yte = X[:1000], y[:1000], X[1000:1300], y[1000:1300]

    def fit(net):
        model = TorchModel(net, epochs=epochs, lr=0.1, momentum=0.0, batch_size=32, random_state=0)
        return RepresentationTracer(model).fit(Xtr, ytr)

    tr = fit(_mlp((64,), False))
    st = tr.class_statistics(Xte)[tr.layers_[-1]]
    v, ep = st["cos"] * st["weight"], st["step"] // -(-len(Xtr) // 32)
    rows = []
    for e0, e1 in ((0, 1), (0, 2), (2, epochs), (5, epochs), (epochs - 1, epochs), (0, epochs)):
        keep = (ep >= e0) & (ep < e1)
        S = np.zeros((len(Xte), len(Xtr)))
        np.add.at(S.T, st["index"][keep], v[:, keep].T)
        rows.append([f"epochs {e0 + 1}-{e1}", f"{_shares(S, ytr, yte)[0]:.3f}",
                     f"{S.sum(1).mean() / v.sum(1).mean():.3f}"])
    print_table(rows, ["updates of", "last-layer top-10 share", "share of ||p|| they build"],
                title="MLP 64-64-10 with biases on digits: which steps' updates are ranked")

    def seq(*mods):
        torch.manual_seed(0)
        return nn.Sequential(*mods)

    variants = [
        ("biases, no normalisation", lambda: seq(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))),
        ("bias-free, no normalisation", lambda: seq(nn.Linear(64, 64, bias=False), nn.ReLU(),
                                                   nn.Linear(64, 10, bias=False))),
        ("biases + BatchNorm1d (affine)", lambda: seq(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                                     nn.Linear(64, 10))),
        ("bias-free + BatchNorm1d (no affine)", lambda: _mlp((64,), True)),
        ("bias-free + LayerNorm (no affine)", lambda: seq(nn.Linear(64, 64, bias=False),
                                                         nn.LayerNorm(64, elementwise_affine=False),
                                                         nn.ReLU(), nn.Linear(64, 10, bias=False))),
    ]
    rows = []
    for name, make in variants:
        tr = fit(make())
        shares = [_shares(tr.attribute(Xte, layer=n), ytr, yte)[0] for n in tr.layers_]
        A_tr, A_te = _last_input(tr, Xtr), _last_input(tr, Xte)
        cos_a = (A_te / np.linalg.norm(A_te, axis=1, keepdims=True)) @ (
            A_tr / np.linalg.norm(A_tr, axis=1, keepdims=True)).T
        rows.append([name, f"{tr.model_.score(Xte, yte):.3f}", f"{shares[0]:.3f}", f"{shares[-1]:.3f}",
                     f"{cos_a[yte[:, None] != ytr[None, :]].mean():.2f}"])
    print_table(rows, ["MLP 64-64-10", "test acc", "first layer: top-10 share", "last layer: top-10 share",
                       "cos of last-layer inputs, other classes"],
                title="Which architecture: biases and normalisation before the ReLU")


def _store_child(mode, n_train, epochs, folder, label):
    """One fit + attribute in this (fresh) process; prints times and the peak RSS."""
    import resource
    import time

    X, y = load_digits_data()
    Xtr, ytr, Xte = X[:n_train], y[:n_train], X[-200:]
    model = TorchModel(make_mlp(0), epochs=epochs, lr=0.1, momentum=0.0, batch_size=64, random_state=0)
    RepresentationTracer(clone(model).set_params(epochs=1)).fit(Xtr[:256], ytr[:256]).attribute(Xte)  # warm-up
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tr = RepresentationTracer(model, store=None if mode == "memory" else folder).fit(Xtr, ytr)
    t1 = time.perf_counter()
    S = tr.attribute(Xte)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(os.path.join(folder, f"scores-{label}.npy"), S)
    print(f"RESULT {t1 - t0:.3f} {t2 - t1:.3f} {(rss - rss0) / 1024:.1f} {tr.record_bytes_ / 2**20:.1f}")


def store_table(n_train, epochs):
    """In memory vs ``store=``: fit and attribute times, peak RSS growth (each in a fresh process),
    record bytes; then a resume after removing the completion markers of the last half of the
    blocks (as if the run had stopped there)."""
    import shutil
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="skattr-trace-")
    rows, res = [], {}

    def run(mode, label):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--store-child", mode,
                              "--n-train", str(n_train), "--epochs", str(epochs), "--folder", folder,
                              "--label", label], capture_output=True, text=True, check=True).stdout
        return [float(v) for v in out.split("RESULT")[1].split()]

    try:
        for mode in ("memory", "store"):
            res[mode] = run(mode, mode)
        markers = sorted(p for p in __import__("pathlib").Path(folder).rglob("*.done"))
        stores = {}
        for p in markers:
            stores.setdefault(p.parent, []).append(p)
        for ms in stores.values():
            for p in ms[len(ms) // 2:]:
                p.unlink()
        res["store, resumed from half"] = run("store", "resumed")
        S0, S1, S2 = (np.load(os.path.join(folder, f"scores-{k}.npy")) for k in ("memory", "store", "resumed"))
        for mode, (fit, att, rss, mib) in res.items():
            rows.append([mode, f"{fit:.2f}", f"{fit / res['memory'][0]:.2f}", f"{att:.2f}",
                         f"{att / res['memory'][1]:.2f}", f"{rss:.0f}", f"{mib:.1f}"])
        print_table(rows, ["records", "fit (s)", "ratio", "attribute 200 (s)", "ratio",
                           "peak RSS growth (MiB)", "record MiB (memory or disk)"],
                    title=f"MLP 64-256-256-10, {n_train} train, {epochs} epochs, batch 64: records in "
                          f"memory vs on disk; max |score difference| from memory: store "
                          f"{np.abs(S1 - S0).max():.1e}, resumed {np.abs(S2 - S0).max():.1e}; "
                          f"resumed vs store bit-identical: {np.array_equal(S1, S2)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--class-agreement", action="store_true")
    parser.add_argument("--store", action="store_true", help="only the memory vs on-disk table")
    parser.add_argument("--class-ablation", action="store_true",
                        help="only the class agreement by training epochs and by architecture")
    parser.add_argument("--store-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.store_child:
        torch.set_num_threads(int(args.threads) or torch.get_num_threads())
        return _store_child(args.store_child, args.n_train, args.epochs, args.folder, args.label)
    if args.store:
        setup(args, "RepresentationTracer: records in memory vs on disk")
        return store_table(args.n_train, args.epochs)
    if args.class_ablation:
        setup(args, "RepresentationTracer: class agreement by epochs and architecture")
        return class_ablation(10)
    if args.class_agreement:
        setup(args, "RepresentationTracer: class agreement on digits")
        return class_agreement()
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.repeats = 500, 50, 3, 1
    setup(args, "RepresentationTracer: recording overhead, storage and error")
    X, y = load_digits_data()
    Xtr, ytr = X[: args.n_train], y[: args.n_train]
    Xte, yte = X[-args.n_test:], y[-args.n_test:]
    n, E = len(Xtr), args.epochs

    for arch, make in (("MLP 64-256-256-10", make_mlp), ("CNN 1-16-32 + Linear", make_cnn)):
        model = TorchModel(make(0), epochs=E, lr=0.1, momentum=0.0, batch_size=64, random_state=0)
        steps = E * -(-n // 64)
        t_plain, _, _ = time_call(lambda m=model: clone(m).fit(Xtr, ytr), repeats=args.repeats)
        t_rec, _, _ = time_call(
            lambda m=model: clone(m).set_params(callbacks=[RepresentationRecorder()]).fit(Xtr, ytr),
            repeats=args.repeats)
        t_fit, _, exact = time_call(lambda m=model: RepresentationTracer(m).fit(Xtr, ytr), repeats=args.repeats)
        print_table(
            [[f"{t_plain:.3f}", f"{t_rec:.3f}", f"{t_rec / t_plain:.2f}", f"{t_fit:.3f}", f"{t_fit / t_plain:.2f}"]],
            ["plain fit (s)", "fit + recorder (s)", "ratio", "RepresentationTracer.fit (s)", "ratio"],
            title=f"{arch}: {n} train, {E} epochs x {steps // E} steps, batch 64, float32 "
                  f"(test acc {exact.model_.score(Xte, yte):.3f})",
        )
        S0 = exact.attribute(Xte)
        pn_layers = {k: exact.recorder_.kinds_.get(k) for k in exact.layers_}
        print(f"record kinds per layer: {pn_layers}")
        configs = [("exact factors", {})]
        if arch.startswith("MLP"):
            configs += [
                ("projection_dim=128", {"projection_dim": 128}),
                ("projection_dim=32", {"projection_dim": 32}),
                ("step_every=2", {"step_every": 2}),
                ("step_every=5", {"step_every": 5}),
                ("projection_dim=32, step_every=5", {"projection_dim": 32, "step_every": 5}),
            ]
        configs += [("record='updates' (batch-shared)", {"record": "updates"})]
        rows = []
        for name, kw in configs:
            tr = exact if not kw else RepresentationTracer(model, **kw).fit(Xtr, ytr)
            S = tr.attribute(Xte)
            rel, corr, ov = _errors(S, S0)
            wres = max(tr.weight_residual_.values())
            rows.append([name, f"{tr.record_bytes_ / (n * E):.0f}", f"{tr.record_bytes_ / 2**20:.1f}",
                         "n/a" if np.isnan(wres) else f"{wres:.1e}", f"{rel:.3g}", f"{corr:.3f}", f"{ov:.2f}"])
        print_table(rows, ["record", "bytes / (example, step)", "total MiB", "weight residual",
                           "influence rel. error", "mean corr", "top-10 overlap"],
                    title=f"{arch}: storage and error against the exact decomposition ({len(Xte)} test points)")
        top = np.argsort(-S0, 1)[:, :10]
        same = ytr[top] == yte[:, None]
        print(f"top-10 of the exact influence sharing the test point's class: {same.mean():.3f} "
              f"(all 10: {same.all(1).mean():.3f})")


if __name__ == "__main__":
    main()
