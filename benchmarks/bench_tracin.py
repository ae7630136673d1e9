"""TracIn speed: skattr vs captum (TracInCP, TracInCPFast, TracInCPFastRandProj), one process.

Same network (MLP 64-256-256-10 on digits), same checkpoints (the end of each of 3 training
epochs, with their learning rates, saved as files for captum), same loss, same training and test
sets.  For each pair the whole pipeline is timed (captum: constructor + ``influence``; skattr:
``TracIn(...).fit(X_train, y_train).attribute(X_test, y_test)``) and the scores are compared:

* exact gradients of every parameter: ``TracIn(model)`` vs ``TracInCP`` (scores must agree to
  float32 rounding);
* the last layer's weight: ``TracIn(model, last_layer=True)`` vs ``TracInCPFast``;
* projected: ``TracIn(model, last_layer=True, projection_dim=k)`` vs ``TracInCPFastRandProj``
  (its own random projection of the last layer, ``projection_dim=k``), at equal accuracy: each
  one's relative error against the exact last-layer scores is printed next to its time; and
  ``TracIn(model, projection_dim=k)`` (every layer, projected) for reference.

Usage::

    python benchmarks/bench_tracin.py              # n_train 1,500, n_test 200 (a few minutes)
    python benchmarks/bench_tracin.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, load_digits_data, make_mlp, print_table, setup, time_call  # noqa: E402

from skattr import TorchModel, TrajectoryRecorder  # noqa: E402
from skattr.estimators import TracIn  # noqa: E402


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--skip-exact-captum", action="store_true",
                   help="skip captum's TracInCP on every parameter (the slowest run)")
    args = p.parse_args(argv)
    setup(args, "TracIn: skattr vs captum")
    from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj
    from captum.influence._utils.nearest_neighbors import NearestNeighbors

    class _NoIndex(NearestNeighbors):  # influence(k=None) never queries it
        def setup(self, data):
            pass

        def get_nearest_neighbors(self, query, k):  # pragma: no cover
            raise NotImplementedError

    n, t = (300, 40) if args.quick else (args.n_train, args.n_test)
    X, y = load_digits_data()
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[-t:], y[-t:]
    model = TorchModel(make_mlp(0), epochs=3, batch_size=64, lr=0.05, momentum=0.9,
                       callbacks=[TrajectoryRecorder()], device="cpu", random_state=0).fit(Xtr, ytr)
    pairs = model.callbacks_[0].tracin_checkpoints()
    d = tempfile.mkdtemp()
    paths = []
    for i, (sd, lr) in enumerate(pairs):
        paths.append(os.path.join(d, f"ck{i}.pt"))
        torch.save({"sd": sd, "lr": lr}, paths[-1])

    def load(net, path):
        ck = torch.load(path)
        net.load_state_dict(ck["sd"])
        return ck["lr"]

    net = copy.deepcopy(model.module_)
    ds = torch.utils.data.TensorDataset(torch.as_tensor(Xtr), torch.as_tensor(ytr))
    test = (torch.as_tensor(Xte), torch.as_tensor(yte))
    bs = 256
    print(f"n_train {n}, n_test {t}, {len(pairs)} checkpoints (lr {[round(lr, 4) for _, lr in pairs]}), "
          f"{sum(p.numel() for p in net.parameters()):,} parameters, batch {bs}")
    rows = []

    def skattr_run(**kw):
        return lambda: TracIn(model, batch_size=bs, **kw).fit(Xtr, ytr).attribute(Xte, yte)

    def rel(S, ref):
        return float(np.linalg.norm(S - ref) / np.linalg.norm(ref))

    # every parameter, exact
    ts, _, S = time_call(skattr_run(), args.repeats)
    if not args.skip_exact_captum:
        tc, _, C = time_call(lambda: TracInCP(
            net, ds, checkpoints=paths, checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=bs,
        ).influence(test, k=None).numpy(), max(1, args.repeats - 2), warmup=0)
        rows.append(["all layers, exact", "TracInCP", tc, ts, tc / ts, rel(S, C), 0.0])
    exact_all = S
    # last layer, exact
    last = net[4]
    ts, _, S_last = time_call(skattr_run(last_layer=True), args.repeats)
    tc, _, C = time_call(lambda: TracInCPFast(
        net, last, ds, checkpoints=paths, checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=bs,
    ).influence(test, k=None).numpy(), args.repeats)
    rows.append(["last layer, exact", "TracInCPFast", tc, ts, tc / ts, rel(S_last, C), 0.0])
    for k in args.dims:
        ts, _, S = time_call(skattr_run(last_layer=True, projection_dim=k), args.repeats)
        tc, _, C = time_call(lambda k=k: TracInCPFastRandProj(
            net, last, ds, checkpoints=paths, checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=bs,
            nearest_neighbors=_NoIndex(), projection_dim=k, seed=0,
        ).influence(test, k=None).numpy(), args.repeats)
        rows.append([f"last layer, k={k}", "TracInCPFastRandProj", tc, ts, tc / ts, rel(S, S_last), rel(C, S_last)])
    for k in args.dims:
        ts, _, S = time_call(skattr_run(projection_dim=k), args.repeats)
        rows.append([f"all layers, k={k} (skattr only)", "-", None, ts, None, rel(S, exact_all), None])
    print_table(rows, ["what", "captum", "captum s", "skattr s", "ratio", "skattr rel. err",
                       "captum rel. err"],
                title="TracIn: whole pipeline (fit + attribute vs constructor + influence), median "
                      "of repeats; rel. err = |S - S_exact|_F / |S_exact|_F (exact runs: against "
                      "captum's own scores)")


if __name__ == "__main__":
    main()
