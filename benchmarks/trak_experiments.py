"""TRAK experiments on digits: exactness, LDS next to Grad-Cos and the ``traker`` package, concepts.

Parts (``--part``, comma-separated; default all; ``--part plot`` redraws the LDS figure from a
previous run's ``results.json``):

``exact``
    TRAK with ``projection_dim=None`` against a direct numpy implementation of the formula
    (per-example margin gradients from ``torch.func.jacrev``, ``(Phi^T Phi + lambda I)^{-1}`` by
    ``numpy.linalg.inv``) on a small float64 MLP, and the relative error of projected TRAK at
    k = 64 ... 8192 (kronecker, factored and Gaussian projections).
``lds``
    Linear datamodeling score on digits for an MLP (64-128-128-10) and a small CNN: ground truth
    from 50 models retrained on random halves; TRAK with 1, 5 and 10 models (members trained on
    random halves), Grad-Cos, and ``traker`` run on the very same members, subsets and
    projection_dim (traker's own ``lambda_reg=0``, and with skattr's ridge matched), side by side.
``seeds`` (not in the default run)
    skattr and ``traker`` (ridge matched) with 1 and 10 models over ``--seeds`` projection seeds:
    mean and standard deviation of the LDS, and the mean paired difference.
``concept``
    The concept "digit with a closed loop" (0, 6, 8, 9) for the MLP and the CNN: L1 probes per
    layer, TRAK attribution of the best layer's probe, remove the top-k attributed training
    examples vs k random ones (k = 5 %, 10 %, 20 %; 3 retraining seeds), re-probe every layer.

Usage::

    python benchmarks/trak_experiments.py                 # everything (~30 min on 2 busy cores)
    python benchmarks/trak_experiments.py --part exact    # seconds
    python benchmarks/trak_experiments.py --quick         # smoke run

Writes tables (markdown), ``results.json`` and figures to ``--out``
(default ``benchmarks/results/trak``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trak import traker_ensemble  # noqa: E402

from skattr import TorchModel  # noqa: E402
from skattr.estimators.trak import TRAK  # noqa: E402
from skattr.reports.trak import (  # noqa: E402
    concept_study,
    concept_table,
    digits_split,
    lds_study,
    lds_table,
    make_cnn,
    make_mlp,
    plot_concept,
    plot_lds,
    template,
)


# ------------------------------------------------------------------------------------ exact
def exact_part(args):
    from torch.func import functional_call, jacrev

    from skattr.reports.trak import digits_split as split

    Xtr, ytr, Xte, yte, _, _ = split(n_train=150, n_test=10)
    Xtr, Xte = Xtr.astype(np.float64), Xte.astype(np.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    model = TorchModel(net, dtype="float64", epochs=10, lr=0.1, random_state=0).fit(Xtr, ytr)
    mod = model.module_
    params = {k: v.detach() for k, v in mod.named_parameters()}

    def margin(p, x, c):
        z = functional_call(mod, (p,), (x[None],))[0]
        o = z.clone()
        o[c] = -float("inf")
        return z[c] - torch.logsumexp(o, 0)

    def grads(X, y):
        rows = []
        for x, c in zip(torch.as_tensor(X), y):
            J = jacrev(margin)(params, x, int(c))
            rows.append(torch.cat([J[k].reshape(-1) for k in params]))
        return torch.stack(rows).numpy()

    ridge = 0.1
    Phi, g = grads(Xtr, ytr), grads(Xte, yte)
    lam = ridge * (Phi**2).sum(1).mean()
    p = model.predict_proba(Xtr)[np.arange(len(ytr)), ytr]
    ref = g @ np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1])) @ Phi.T * (1 - p)
    S = TRAK(model, projection_dim=None, ridge=ridge).fit(Xtr, ytr).attribute(Xte, yte)
    err = np.abs(S - ref).max() / np.abs(ref).max()
    print(f"\nExact TRAK vs numpy formula: MLP 64-16-10 float64 ({Phi.shape[1]} parameters), "
          f"n_train {len(ytr)}, ridge {ridge}: max |skattr - numpy| / max |numpy| = {err:.2e}")
    rows = []
    dims = [64, 256] if args.quick else [64, 256, 1024, 4096, 8192]
    for k in dims:
        row = [k]
        for proj in ("kronecker", "factored", "gaussian"):
            Sk = TRAK(model, projection_dim=k, projection=proj, ridge=ridge).fit(Xtr, ytr).attribute(Xte, yte)
            rel = np.linalg.norm(Sk - S) / np.linalg.norm(S)
            corr = np.corrcoef(Sk.ravel(), S.ravel())[0, 1]
            row += [rel, corr]
        rows.append(row)
    print_md(rows, ["k", "kronecker rel. error", "kronecker corr.", "factored rel. error", "factored corr.",
                    "gaussian rel. error", "gaussian corr."],
             "Projected TRAK vs exact TRAK (same model and ridge): relative Frobenius error, correlation")
    return {"exact_max_rel_error": float(err), "convergence": rows}


# -------------------------------------------------------------------------------------- LDS
ARCHS = {
    "MLP": (lambda: make_mlp(128, 2, seed=0), False),
    "CNN": (lambda: make_cnn(seed=0), True),
}


def _lds_setup(args, arch):
    """Data split, model template and cache folder of the LDS parts for one architecture."""
    make, images = ARCHS[arch]
    n_train, n_test = (300, 60) if args.quick else (1000, 200)
    Xtr, ytr, Xte, yte, _, _ = digits_split(images=images, n_train=n_train, n_test=n_test)
    model = template(make(), epochs=10 if args.quick else 30)
    cache_dir = os.path.join(args.cache or os.path.join(args.out, "cache"), arch)
    return Xtr, ytr, Xte, yte, model, cache_dir


def lds_part(args):
    out = {}
    rows_by_arch = {}
    for arch in args.archs:
        Xtr, ytr, Xte, yte, model, cache_dir = _lds_setup(args, arch)
        n_train, n_test = len(Xtr), len(Xte)
        t0 = time.perf_counter()
        ens = (1, 2) if args.quick else (1, 5, 10)
        dims = (256,) if args.quick else tuple(args.dims)
        res = lds_study(model, Xtr, ytr, Xte, yte, n_subsets=8 if args.quick else args.n_subsets,
                        ensembles=ens, dims=dims, ridge=args.ridge,
                        extra_dims=() if args.quick else (args.extra_dim, None),
                        cache_dir=cache_dir, verbose=args.verbose)
        rows = res["rows"]
        ret, members = res["retrainer"], res["members"]
        sweep = []
        if not args.quick:  # the default ridge, justified: skattr TRAK-10 at the largest k
            for r in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0):
                tr = TRAK(model, models=members, projection_dim=dims[-1], ridge=r).fit(Xtr, ytr)
                sweep.append((r, ret.score(tr, Xte, yte)))
            print(f"\n{arch}: skattr TRAK-{len(members)} LDS vs ridge (k={dims[-1]}): "
                  + ", ".join(f"{r:g}: {v:.3f}" for r, v in sweep))
        modules = [m.module_ for m in members]
        for k in dims:
            ridges = [None, args.ridge]
            scs, secs = traker_ensemble(modules, Xtr, ytr, Xte, yte, k, ensembles=ens, ridge=ridges)
            for ridge, sc in zip(ridges, scs):
                for M in ens:
                    rows.append({
                        "method": f"traker TRAK-{M}" + (" (lambda_reg=0)" if ridge is None else " (ridge matched)"),
                        "library": "traker", "n_models": M, "projection_dim": k, "ridge": ridge,
                        "lds": ret.score(sc[M], Xte, yte), "seconds": secs,
                    })
        title = (f"{arch}: LDS on {n_test} test digits ({n_train} training digits; "
                 f"{ret.n_subsets} models retrained on random halves; test accuracy of the "
                 f"full-data model {res['test_accuracy']:.3f}, of the half-data members "
                 f"{res['member_accuracy']:.3f}); {time.perf_counter() - t0:.0f} s")
        print(f"\n{title}\n")
        print(lds_table(sorted(rows, key=_lds_order)))
        rows_by_arch[arch] = rows
        out[arch] = {"rows": rows, "title": title, "ridge_sweep": sweep}
    fig = plot_lds(rows_by_arch, os.path.join(args.out, "lds_vs_models.png"))
    out["figure"] = fig
    # goal checks
    for arch, rows in rows_by_arch.items():
        for r in rows:
            if r["library"] != "traker":
                continue
            mine = [s for s in rows if s["library"] == "skattr" and s["method"].startswith("skattr TRAK-")
                    and "full" not in s["method"] and s["n_models"] == r["n_models"]
                    and s["projection_dim"] == r["projection_dim"]]
            if mine:
                ok = mine[0]["lds"] >= r["lds"]
                print(f"{arch} k={r['projection_dim']} M={r['n_models']}: skattr {mine[0]['lds']:.3f} "
                      f"{'>=' if ok else '<'} {r['method']} {r['lds']:.3f}")
    return out


def _lds_order(r):
    lib = {"skattr": 0, "traker": 1}.get(r["library"], 2)
    k = r["projection_dim"]
    k = 10**9 if (k is None and not r["method"].startswith("Grad")) else (k or 0)
    variant = r["method"].split(" (")[1] if " (" in r["method"] else ""
    return (k, lib, variant, r["n_models"])


def seeds_part(args):
    """skattr vs traker (ridge matched) over several projection seeds: mean +- std, paired diffs."""
    out = {}
    for arch in args.archs:
        Xtr, ytr, Xte, yte, model, cache_dir = _lds_setup(args, arch)
        ens = (1, 2) if args.quick else (1, 10)
        dims = (256,) if args.quick else tuple(args.dims)
        res = lds_study(model, Xtr, ytr, Xte, yte, n_subsets=8 if args.quick else args.n_subsets,
                        ensembles=(max(ens),), dims=(dims[0],), ridge=args.ridge, gradcos=False,
                        cache_dir=cache_dir)
        ret, members = res["retrainer"], res["members"]
        modules = [m.module_ for m in members]
        rows = []
        for k in dims:
            for M in ens:
                sk, tk = [], []
                for seed in range(args.seeds):
                    tr = TRAK(model, models=members[:M], projection_dim=k, ridge=args.ridge,
                              projection=args.projection, random_state=seed).fit(Xtr, ytr)
                    sk.append(ret.score(tr, Xte, yte))
                    sc, _ = traker_ensemble(modules[:M], Xtr, ytr, Xte, yte, k, ensembles=[M],
                                            ridge=args.ridge, seed=seed)
                    tk.append(ret.score(sc[M], Xte, yte))
                sk, tk = np.array(sk), np.array(tk)
                d = sk - tk
                rows.append([arch, k, M, f"{sk.mean():.3f} ± {sk.std(ddof=1):.3f}",
                             f"{tk.mean():.3f} ± {tk.std(ddof=1):.3f}",
                             f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
        out[arch] = rows
    print_md([r for a in out.values() for r in a],
             ["model", "k", "models", f"skattr TRAK ({args.projection})", "traker (ridge matched)", "skattr - traker"],
             f"LDS over {args.seeds} projection seeds (skattr random_state = traker seed = 0..{args.seeds - 1}; "
          f"same members, subsets and ridge={args.ridge:g}; ± is the std over seeds, and the "
          "standard error of the mean paired difference)")
    return out


# ---------------------------------------------------------------------------------- concept
def concept_part(args):
    out = {}
    for arch in args.archs:
        make, images = ARCHS[arch]
        n_train = 300 if args.quick else 1000
        Xtr, ytr, Xte, yte, Xr, yr = digits_split(images=images, n_train=n_train, n_test=200)
        model = template(make(), epochs=10 if args.quick else 30)
        layers = ["1", "3", "4"] if arch == "MLP" else ["1", "3", "5"]
        t0 = time.perf_counter()
        res = concept_study(model, Xtr, ytr, Xr, yr, layers=layers,
                            fractions=(0.1,) if args.quick else (0.05, 0.1, 0.2),
                            n_seeds=2 if args.quick else 3, projection_dim=args.dims[-1],
                            ridge=args.ridge, verbose=args.verbose)
        print(f"\n{arch}: concept 'closed loop' (0, 6, 8, 9); probes on {len(yr)} held-out digits "
              f"(L1, C=0.1; accuracy on a 30 % split); layers {layers} (last = logits); "
              f"{time.perf_counter() - t0:.0f} s\n")
        print("| layer | probe accuracy | sparsity | active weights |\n|---|---|---|---|")
        for r in res["probe"]:
            print(f"| {r['layer']} | {r['accuracy']:.3f} | {r['sparsity']:.2f} | {r['n_active']}/{r['n_dims']} |")
        print(f"\nbest layer {res['best_layer']} (majority-class accuracy {res['chance']:.3f}); TRAK of the "
              f"probe (k={args.dims[-1]}): closed-loop share of the top-k "
              + ", ".join(f"{f:.0%}: {s:.2f}" for f, s in res["top_concept_share"].items())
              + f" (base rate {res['base_rate']:.2f})\n")
        print(concept_table(res))
        fig = plot_concept(res, os.path.join(args.out, f"concept_{arch.lower()}.png"),
                           title=f"{arch}, closed-loop concept")
        res = dict(res)
        res["scores"] = res["scores"].tolist()
        res["rar"] = {k: v for k, v in res["rar"].items() if k != "removed"}
        out[arch] = {**res, "figure": fig}
    return out


# ------------------------------------------------------------------------------------ utils
def print_md(rows, headers, title):
    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="exact,lds,concept")
    p.add_argument("--archs", default="MLP,CNN")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trak"))
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--cache", default=None,
                   help="where trained subset models / ensemble members are cached (default OUT/cache)")
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--extra-dim", type=int, default=8192,
                   help="an extra skattr-only projection size (rows also for exact TRAK)")
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--seeds", type=int, default=5, help="projection seeds of the 'seeds' part")
    p.add_argument("--projection", default="factored", help="skattr's projection in the 'seeds' part")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load avg {load:.2f}; "
          f"argv: {' '.join(sys.argv[1:]) or '(defaults)'}")
    results = {}
    t0 = time.perf_counter()
    if args.part == "plot":  # redraw the figures from a previous run's results.json
        with open(os.path.join(args.out, "results.json")) as f:
            prev = json.load(f)
        plot_lds({a: prev["lds"][a]["rows"] for a in args.archs if a in prev.get("lds", {})},
                 os.path.join(args.out, "lds_vs_models.png"))
        print(f"redrew {args.out}/lds_vs_models.png")
        return 0
    for part in [s.strip() for s in args.part.split(",") if s.strip()]:
        fn = {"exact": exact_part, "lds": lds_part, "concept": concept_part, "seeds": seeds_part}[part]
        results[part] = fn(args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json)
    print(f"\nwrote {args.out}/results.json and figures; total {time.perf_counter() - t0:.0f} s")
    return 0


def _json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
