"""Main-job section: the attribution methods compared on digits.

:func:`attribution_study` scores every attribution method on the same training / test split and
against the same retrained models (:class:`skattr.metrics.SubsetRetrainer`): the linear
datamodeling score (LDS) of TRAK with one and several models, TracIn, HYDRA, influence functions (each
solver that fits the model) and Grad-Cos, and next to it the Kendall-tau fidelity of a
kernel-ridge surrogate built on each method's kernel (:meth:`BaseAttributor.kernel`) beside the
trace NTK's.  Shared with ``benchmarks/attribution_comparison.py``, which runs it at full size.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from sklearn.base import clone

from ..estimators import HYDRA, TRAK, GradCosKernel, TraceNTK, TracIn
from ..metrics import KernelAttribution, SubsetRetrainer
from ..surrogates import KernelSurrogate
from ..training import TrajectoryRecorder

__all__ = ["attribution_study", "attribution_table", "attribution_report", "plot_attribution"]


def _influence_class():
    try:
        from ..estimators.influence import InfluenceFunction
    except ImportError:  # pragma: no cover - built in the same release
        return None
    return InfluenceFunction


def _n_params(model):
    return sum(p.numel() for p in model.network().parameters() if p.requires_grad)


def attribution_study(model, Xtr, ytr, Xte, yte, *, n_subsets=50, n_models=10, projection_dim=2048,
                      solvers=("cg", "lissa", "ekfac"), damping=None, lissa_iter=300, cg_iter=None, exact_max_params=5000,
                      fidelity=True, cache_dir=None, random_state=0, verbose=0):
    """LDS (and surrogate fidelity) of every attribution method on one split.

    Parameters
    ----------
    model : TorchModel
        Template: its training recipe is reused for the full-data model (fitted here with a
        :class:`~skattr.TrajectoryRecorder` for TracIn), the TRAK members and the LDS models.
    n_subsets : int
        Models retrained on random halves (the LDS ground truth).
    n_models : int
        Size of the larger TRAK ensemble (TRAK-1 is the full-data model).
    solvers : tuple of str
        Influence-function solvers; ``"exact"`` is added when the network has at most
        ``exact_max_params`` parameters.
    damping : float or None
        Influence functions' damping (``None``: the estimator's default).
    lissa_iter : int
        LiSSA's iterations (its default suits a small network; each is a Hessian-vector product
        over the training set for every target).
    cg_iter : int or None
        CG's iterations (None: the estimator's default).
    fidelity : bool
        Also fit a kernel-ridge surrogate on each method's kernel and report its Kendall tau
        (not for CG / LiSSA influence functions, whose training kernel costs ``n_train``
        iterative solves).

    Returns
    -------
    dict
        ``rows`` (method, LDS, tau, seconds), ``retrainer``, ``full_model``, accuracies.
    """
    t0 = time.perf_counter()
    ret = SubsetRetrainer(model, n_subsets=n_subsets, cache_dir=cache_dir,
                          random_state=random_state, verbose=verbose).fit(Xtr, ytr)
    t_ret = time.perf_counter() - t0
    full = clone(model).set_params(callbacks=[TrajectoryRecorder()]).fit(Xtr, ytr)
    store = None if cache_dir is None else os.path.join(cache_dir, "trak_members")
    members = TRAK(model, n_models=n_models, projection_dim=8, store=store,
                   random_state=random_state + 1).fit(Xtr, ytr).models_
    methods = [
        ("TRAK-1", TRAK(full, projection_dim=projection_dim, random_state=random_state)),
        (f"TRAK-{n_models}", TRAK(model, models=members, projection_dim=projection_dim,
                                  random_state=random_state)),
        ("TracIn", TracIn(full)),
        # trains its own copy of the template (the same seeded run as ``full``), carrying the
        # projected hypergradients of every training example
        ("HYDRA", HYDRA(model, projection_dim=projection_dim, random_state=random_state)),
    ]
    IF = _influence_class()
    if IF is not None:
        sol = list(solvers)
        if _n_params(full) <= exact_max_params and "exact" not in sol:
            sol.insert(0, "exact")
        kw = {} if damping is None else {"damping": damping}
        for s in sol:
            extra = {"n_iter": lissa_iter} if s == "lissa" else ({"n_iter": cg_iter} if s == "cg" and cg_iter else {})
            methods.append((f"IF ({s})", IF(full, solver=s, random_state=random_state, **kw, **extra)))
    methods.append(("Grad-Cos", KernelAttribution(GradCosKernel(full, labels="given"))))
    rows = []
    for name, est in methods:
        t = time.perf_counter()
        row = {"method": name}
        try:
            est.fit(Xtr, ytr)
            row["lds"] = float(ret.score(est, Xte, yte))
        except Exception as exc:  # noqa: BLE001 - a method that cannot run here is reported, not hidden
            row["lds"], row["error"] = float("nan"), f"{type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - t
        # an iterative solver's kernel on the training set costs n_train linear solves
        cheap = name not in ("Grad-Cos", "HYDRA") and "(cg)" not in name and "(lissa)" not in name
        if fidelity and cheap and "error" not in row:
            try:
                sur = KernelSurrogate(est, "krr").fit(Xtr)
                row["tau"] = float(sur.score(Xte, yte))
            except Exception as exc:  # noqa: BLE001
                row["tau"], row["tau_error"] = float("nan"), f"{type(exc).__name__}: {exc}"
        rows.append(row)
    if fidelity:
        t = time.perf_counter()
        tau = KernelSurrogate(TraceNTK(full), "krr").fit(Xtr).score(Xte, yte)
        rows.append({"method": "trace NTK (reference kernel)", "lds": float("nan"), "tau": float(tau),
                     "seconds": time.perf_counter() - t})
    return {"rows": rows, "retrainer": ret, "full_model": full, "retrain_seconds": t_ret,
            "test_accuracy": float(full.score(Xte, yte)),
            "member_accuracy": float(np.mean([m.score(Xte, yte) for m in members]))}


def attribution_table(rows):
    lines = ["| method | LDS | surrogate tau (KRR) | seconds |", "|---|---|---|---|"]
    for r in rows:
        lds = "-" if not np.isfinite(r.get("lds", np.nan)) else f"{r['lds']:.3f}"
        tau = "-" if not np.isfinite(r.get("tau", np.nan)) else f"{r['tau']:.3f}"
        note = f" ({r['error']})" if "error" in r else (f" (surrogate: {r['tau_error']})" if "tau_error" in r else "")
        lines.append(f"| {r['method']}{note} | {lds} | {tau} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_attribution(rows_by_arch, path):
    """LDS and surrogate tau per method, one panel per architecture (shared y-range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows_by_arch)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False, sharey=True)
    for ax, (arch, rows) in zip(axes[0], rows_by_arch.items()):
        names = [r["method"] for r in rows]
        x = np.arange(len(rows))
        lds = [r.get("lds", np.nan) for r in rows]
        tau = [r.get("tau", np.nan) for r in rows]
        ax.bar(x - 0.2, np.nan_to_num(lds), 0.4, label="LDS")
        ax.bar(x + 0.2, np.nan_to_num(tau), 0.4, label="surrogate Kendall tau")
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(arch)
        ax.set_ylabel("score")
        ax.axhline(0, color="k", lw=0.6)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attribution_report(outdir, random_state=0, quick=False, verbose=0):
    """The attribution section of ``python -m skattr``: every method's LDS and kernel fidelity
    on digits (MLP).  Writes ``attribution.md`` and ``attribution_methods.png``."""
    from .trak import digits_split, make_mlp, template

    os.makedirs(outdir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        n_train, n_test = (300, 60) if quick else (500, 100)
        Xtr, ytr, Xte, yte, _, _ = digits_split(n_train=n_train, n_test=n_test, random_state=random_state)
        model = template(make_mlp(64, 2, seed=random_state), epochs=15, lr=0.1, batch_size=128,
                         random_state=random_state)
        res = attribution_study(model, Xtr, ytr, Xte, yte, n_subsets=10 if quick else 20,
                                n_models=5 if quick else 10, projection_dim=1024,
                                solvers=("cg", "ekfac"),
                                cache_dir=os.path.join(os.path.dirname(outdir), "cache"),
                                random_state=random_state, verbose=verbose)
        fig = plot_attribution({"MLP 64-64-64-10": res["rows"]},
                               os.path.join(outdir, "attribution_methods.png"))
        md = ["## Attribution methods compared (digits, MLP)", "",
              f"{n_train} training / {n_test} test digits; LDS against {res['retrainer'].n_subsets} "
              f"models retrained on random halves; surrogate tau: Kendall tau of a kernel-ridge "
              f"surrogate on each method's kernel (test accuracy of the network "
              f"{res['test_accuracy']:.3f}).", "", attribution_table(res["rows"]), ""]
        with open(os.path.join(outdir, "attribution.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        best = max((r for r in res["rows"] if np.isfinite(r.get("lds", np.nan))), key=lambda r: r["lds"])
        return {
            "lds": ", ".join(f"{r['method']} {r['lds']:.3f}" for r in res["rows"]
                             if np.isfinite(r.get("lds", np.nan))),
            "surrogate_tau": ", ".join(f"{r['method']} {r['tau']:.3f}" for r in res["rows"]
                                       if np.isfinite(r.get("tau", np.nan))),
            "best": f"{best['method']} (LDS {best['lds']:.3f})",
            "table": os.path.join(outdir, "attribution.md"),
            "seconds": round(time.perf_counter() - t0, 1),
            "figures": [fig],
        }
    finally:
        torch.set_num_threads(threads)
