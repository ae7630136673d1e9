"""Influence functions: solver convergence against the exact formula, and EK-FAC against kronfluence.

Part ``convergence`` (float64, digits, an MLP small enough for the exact Hessian):

* CG and LiSSA (whole-set HVPs, and stochastic minibatches) against ``solver="exact"``:
  relative error ``max |S - S_exact| / max |S_exact|`` and Pearson correlation of the scores
  as the iterations grow;
* EK-FAC (Gauss-Newton and empirical Fisher) against exact: Pearson / Spearman of the scores,
  for several dampings (EK-FAC approximates a Gauss-Newton / Fisher matrix, not ``H``).

Part ``kronfluence`` (float32, one process, same model / data / damping): skattr's EK-FAC vs
kronfluence's EK-FAC (``pip install --no-deps kronfluence accelerate einops einconv opt-einsum
safetensors psutil huggingface_hub``; it needs no torchvision), both with the empirical Fisher
(deterministic), damping absolute: correlation of the scores and time of factors + pairwise
scores, interleaved repeats, after one warm-up run of each.

    OMP_NUM_THREADS=1 python benchmarks/bench_influence.py --part convergence
    OMP_NUM_THREADS=1 python benchmarks/bench_influence.py --part kronfluence [--kf-arch cnn]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from skattr import TorchModel  # noqa: E402
from skattr.estimators.influence import InfluenceFunction  # noqa: E402


def digits(dtype):
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(dtype)
    rng = np.random.default_rng(0)
    p = rng.permutation(len(X))
    return X[p], y[p]


def rel_err(S, E):
    return float(np.abs(S - E).max() / np.abs(E).max())


def pearson(S, E):
    return float(np.corrcoef(S.ravel(), E.ravel())[0, 1])


def spearman(S, E):
    return float(spearmanr(S.ravel(), E.ravel())[0])


# ==========================================================================================
# convergence
# ==========================================================================================
def convergence(args):
    X, y = digits("float64")
    n, t = args.n_train, args.n_test
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n : n + t], y[n : n + t]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.Tanh(),
                              torch.nn.Linear(args.hidden, 10))
    model = TorchModel(net, epochs=args.epochs, lr=0.1, batch_size=32, dtype="float64",
                       random_state=0).fit(Xtr, ytr)
    lam = args.damping
    t0 = time.perf_counter()
    ex = InfluenceFunction(model, solver="exact", damping=lam).fit(Xtr, ytr)
    E = ex.attribute(Xte, yte)
    t_exact = time.perf_counter() - t0
    ev = ex.hessian_eigenvalues_
    print(f"digits: {n} train, {t} test; MLP 64-{args.hidden}-10 (tanh), D = {ex.n_params_} "
          f"parameters, {args.epochs} epochs, float64; train acc {model.score(Xtr, ytr):.3f}")
    print(f"H: eigenvalues in [{ev.min():.3g}, {ev.max():.3g}], {int((ev < 0).sum())} negative; "
          f"damping = {lam}; exact solver {t_exact:.2f} s (fit + {t} targets)\n")

    def run(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t0 = time.perf_counter()
            inf = InfluenceFunction(model, damping=lam, tol=1e-14, **kw).fit(Xtr, ytr)
            S = inf.attribute(Xte, yte)
            return S, time.perf_counter() - t0, inf

    print("| solver | iterations | rel. error | Pearson | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for it in args.cg_iters:
        S, dt, _ = run(solver="cg", n_iter=it)
        print(f"| CG | {it} | {rel_err(S, E):.2e} | {pearson(S, E):.6f} | {dt:.2f} |")
    scale = None
    for it in args.lissa_iters:
        S, dt, inf = run(solver="lissa", n_iter=it, lissa_scale=scale)
        scale = inf.lissa_scale_
        print(f"| LiSSA (whole set, s = {scale:.3g}) | {it} | {rel_err(S, E):.2e} | "
              f"{pearson(S, E):.6f} | {dt:.2f} |")
    for it in args.lissa_mb_iters:
        S, dt, inf = run(solver="lissa", n_iter=it, lissa_scale=scale,
                         lissa_batch_size=args.lissa_batch)
        print(f"| LiSSA (minibatch {args.lissa_batch}) | {it} | {rel_err(S, E):.2e} | "
              f"{pearson(S, E):.6f} | {dt:.2f} |")

    print("\n| EK-FAC curvature | damping | Pearson vs exact | Spearman vs exact | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for d in args.ekfac_dampings:
        Ed = E if d == lam else InfluenceFunction(model, damping=d).fit(Xtr, ytr).attribute(Xte, yte)
        for fisher in ("ggn", "empirical"):
            t0 = time.perf_counter()
            S = InfluenceFunction(model, solver="ekfac", damping=d, fisher=fisher).fit(
                Xtr, ytr).attribute(Xte, yte)
            dt = time.perf_counter() - t0
            print(f"| {fisher} | {d} | {pearson(S, Ed):.4f} | {spearman(S, Ed):.4f} | {dt:.2f} |")


# ==========================================================================================
# kronfluence
# ==========================================================================================
def kronfluence_side_by_side(args):
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as exc:  # pragma: no cover - depends on the environment
        print(f"kronfluence is not installed ({exc}); see this file's docstring.")
        return
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    X, y = digits("float32")
    n, t = args.kf_train, args.kf_test
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n : n + t], y[n : n + t]
    torch.manual_seed(0)
    h = args.kf_hidden
    if args.kf_arch == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                  torch.nn.ReLU(), torch.nn.Linear(h, 10))
        arch = f"MLP 64-{h}-{h}-10 (ReLU)"
    else:
        X = X.reshape(-1, 1, 8, 8)
        Xtr, Xte = X[:n], X[n : n + t]
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))
        arch = "CNN conv(1-16, 3x3)-conv(16-32, 3x3, stride 2)-linear(512-10) (ReLU)"
    model = TorchModel(net, epochs=20, lr=0.1, batch_size=32, random_state=0).fit(Xtr, ytr)
    lam = args.kf_damping
    bs = args.kf_batch

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, labels = batch
            z = model(x)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(z.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(z, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            x, labels = batch
            return torch.nn.functional.cross_entropy(model(x), labels, reduction="sum")

    train_ds = torch.utils.data.TensorDataset(torch.as_tensor(Xtr), torch.as_tensor(ytr))
    query_ds = torch.utils.data.TensorDataset(torch.as_tensor(Xte), torch.as_tensor(yte))
    kf_net = prepare_model(copy_module(model.network()), ClassificationTask())
    out_dir = tempfile.mkdtemp(prefix="kf-")

    def run_kf(fisher="empirical", tag="x"):
        analyzer = Analyzer(analysis_name="bench", model=kf_net, task=ClassificationTask(),
                            cpu=True, disable_tqdm=True, output_dir=out_dir)
        fa = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical")
        sa = ScoreArguments(damping_factor=lam)
        with contextlib.redirect_stderr(io.StringIO()):
            analyzer.fit_all_factors(f"f{tag}", dataset=train_ds, per_device_batch_size=bs,
                                     factor_args=fa, overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(f"s{tag}", f"f{tag}", query_dataset=query_ds,
                                             train_dataset=train_ds, per_device_query_batch_size=t,
                                             per_device_train_batch_size=bs, score_args=sa,
                                             overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(f"s{tag}")["all_modules"].double().numpy()

    def run_skattr(fisher="empirical"):
        inf = InfluenceFunction(model, solver="ekfac", damping=lam, fisher=fisher, batch_size=bs)
        return inf.fit(Xtr, ytr).attribute(Xte, yte)

    run_kf(tag="warm"), run_skattr()  # warm-up: one-off start-up costs of both
    times = {"skattr": [], "kronfluence": []}
    for r in range(args.repeats):
        for name in (("skattr", "kronfluence") if r % 2 == 0 else ("kronfluence", "skattr")):
            t0 = time.perf_counter()
            S = run_skattr() if name == "skattr" else run_kf(tag=str(r))
            times[name].append(time.perf_counter() - t0)
            if name == "skattr":
                S_sk = S
            else:
                S_kf = S
    D = sum(p.numel() for p in model.network().parameters())
    print(f"digits: {n} train, {t} queries; {arch}, D = {D}, float32, damping = {lam} (absolute), empirical Fisher, batch {bs}; "
          f"torch threads {torch.get_num_threads()}\n")
    print("| | skattr EK-FAC | kronfluence EK-FAC |")
    print("|---|---:|---:|")
    tk, ts = np.median(times["kronfluence"]), np.median(times["skattr"])
    print(f"| factors + {t} x {n} scores, median of {args.repeats} (s) | {ts:.3f} | {tk:.3f} |")
    print(f"\nspeed ratio kronfluence / skattr: {tk / ts:.2f}x")
    print(f"scores: Pearson {pearson(S_sk, S_kf):.6f}, Spearman {spearman(S_sk, S_kf):.6f}, "
          f"rel. max difference {rel_err(S_sk, S_kf):.2e} (signs "
          f"{'agree' if pearson(S_sk, S_kf) > 0 else 'are opposite'})")
    # the Gauss-Newton variant against kronfluence's (sampled) true Fisher
    S_g, S_t = run_skattr("ggn"), run_kf("true", tag="true")
    print(f"skattr fisher='ggn' vs kronfluence true Fisher (sampled labels): Pearson "
          f"{pearson(S_g, S_t):.4f}, Spearman {spearman(S_g, S_t):.4f}")


def copy_module(net):
    import copy

    return copy.deepcopy(net)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["convergence", "kronfluence", "all"], default="all")
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--cg-iters", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100, 200])
    ap.add_argument("--lissa-iters", type=int, nargs="+", default=[10, 100, 300, 1000])
    ap.add_argument("--lissa-mb-iters", type=int, nargs="+", default=[10, 100, 1000, 3000])
    ap.add_argument("--lissa-batch", type=int, default=100)
    ap.add_argument("--ekfac-dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    ap.add_argument("--kf-train", type=int, default=1500)
    ap.add_argument("--kf-test", type=int, default=100)
    ap.add_argument("--kf-hidden", type=int, default=128)
    ap.add_argument("--kf-arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--kf-damping", type=float, default=1e-3)
    ap.add_argument("--kf-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.part in ("convergence", "all"):
        convergence(args)
    if args.part in ("kronfluence", "all"):
        print()
        kronfluence_side_by_side(args)


if __name__ == "__main__":
    main()
