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

``--class-agreement``: for three MLPs on digits (1,000 train / 300 test, batch 32), the share of
each test point's top-10 proponents in its class, and per layer how often the class with the
largest summed influence (``class_statistics``) is the test point's own.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
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


def class_agreement():
    import torch
    from torch import nn

    X, y = load_digits_data()
    Xtr, ytr, Xte, yte = X[:1000], y[:1000], X[1000:1300], y[1000:1300]
    rows = []
    for hidden, epochs in (((64,), 10), ((64, 64), 30), ((256, 256), 10)):
        torch.manual_seed(0)
        dims, layers = (64, *hidden), []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(dims[-1], 10))
        model = TorchModel(net, epochs=epochs, lr=0.1, momentum=0.0, batch_size=32, random_state=0)
        tr = RepresentationTracer(model).fit(Xtr, ytr)
        same = ytr[tr.top_k(Xte, k=10).proponents] == yte[:, None]
        stats = tr.class_statistics(Xte[:100])
        own = [float((s["classes"][s["influence_by_class"].argmax(1)] == yte[:100]).mean())
               for s in stats.values()]
        rows.append(["MLP " + "-".join(map(str, (*dims, 10))), epochs, f"{tr.model_.score(Xte, yte):.3f}",
                     f"{same.mean():.3f}", f"{same.all(1).mean():.3f}", f"{(same.mean(1) > 0.5).mean():.3f}",
                     " / ".join(f"{o:.2f}" for o in own)])
    print_table(rows, ["network", "epochs", "test acc", "top-10 share", "all 10", "majority",
                       "own class dominates (per layer, first 100 test points)"],
                title="Class agreement (exact influence, layers summed)")


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--class-agreement", action="store_true")
    args = parser.parse_args()
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
