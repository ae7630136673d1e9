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
from sklearn.base import clone

from ..estimators import HYDRA, TRAK, GradCosKernel, TraceNTK, TracIn
from ..metrics import KernelAttribution, SubsetRetrainer
from ..parallel import torch_threads
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
                      fidelity=True, cache_dir=None, random_state=0, verbose=0, progress=None):
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

    progress : Progress or None
        Told of one step for the ground truth, one for the full-data model and the TRAK
        members, one per method and one for the reference kernel (with ``fidelity``).

    Returns
    -------
    dict
        ``rows`` (method, LDS, tau, seconds), ``retrainer``, ``full_model``, accuracies.
    """
    from .progress import ensure

    progress = ensure(progress)
    progress.step("attribution", f"LDS ground truth: {n_subsets} models on random halves "
                  "(shared with the trak section when cached)")
    t0 = time.perf_counter()
    ret = SubsetRetrainer(model, n_subsets=n_subsets, cache_dir=cache_dir,
                          random_state=random_state, verbose=verbose).fit(Xtr, ytr)
    t_ret = time.perf_counter() - t0
    progress.step("attribution", f"train the full-data network (recording checkpoints) and "
                  f"{n_models} TRAK members")
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
        progress.step("attribution", f"{name}: fit, LDS" + (", surrogate tau" if fidelity else ""))
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
        progress.step("attribution", "reference: KRR surrogate on the trace NTK")
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
    """LDS and surrogate tau per method, one panel per architecture (shared y-range).

    A method without a value (not run, or failed) gets no bar and an "n/a" mark, never a bar at 0.
    """
    from .. import plotting

    plt = plotting._plt()
    n = len(rows_by_arch)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.4), squeeze=False, sharey=True)
    for ax, (arch, rows) in zip(axes[0], rows_by_arch.items()):
        names = [r["method"] for r in rows]
        x = np.arange(len(rows))
        for off, key, label in ((-0.2, "lds", "LDS"), (0.2, "tau", "surrogate Kendall tau (KRR)")):
            v = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            ok = np.isfinite(v)
            ax.bar(x[ok] + off, v[ok], 0.4, label=label, color="C0" if key == "lds" else "C1")
            for xi in x[~ok]:
                ax.text(xi + off, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(arch)
        ax.set_xlabel("attribution method")
        ax.axhline(0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("score (LDS: Spearman; tau: Kendall)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return plotting.save(fig, path)


#: LDS ground truth and TRAK members as in the trak section (shared through OUT/cache);
#: influence-function solvers per run size.
SOLVERS = {"tiny": ("ekfac",), "quick": ("ekfac",), "default": ("ekfac",), "full": ("cg", "ekfac")}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    # ground truth, members, TRAK-1, TRAK-M, TracIn, HYDRA, IF per solver, Grad-Cos, reference, plots
    return 2 + 4 + len(SOLVERS[size]) + 1 + 1 + 1


def attribution_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """The attribution section of ``python -m skattr``: every method's LDS and kernel fidelity
    on digits (MLP).  Writes ``attribution_methods.png``; returns a
    :class:`~skattr.reports.document.Section`."""
    from .document import Section
    from .progress import ensure
    from .trak import SIZES, report_split

    progress = ensure(progress)
    cfg = SIZES[size]
    os.makedirs(outdir, exist_ok=True)
    with torch_threads(1):
        (Xtr, ytr, Xte, yte, _, _), model = report_split(size, random_state)
        M = max(cfg["ensembles"])
        res = attribution_study(model, Xtr, ytr, Xte, yte, n_subsets=cfg["n_subsets"], n_models=M,
                                projection_dim=cfg["k"], solvers=SOLVERS[size], exact_max_params=0,
                                cache_dir=os.path.join(os.path.dirname(os.path.abspath(outdir)), "cache"),
                                random_state=random_state, verbose=verbose, progress=progress)
        progress.step("attribution", "plots")
        path = plot_attribution({"MLP 64-64-64-10, digits": res["rows"]},
                                os.path.join(outdir, "attribution_methods.png"))
    sec = Section(
        "attribution", "Attribution methods compared",
        "Every attribution method scores each training digit's effect on each test prediction; the "
        "LDS says how well those scores predict models retrained on random halves, and the "
        "surrogate tau how faithful a kernel machine on the method's own kernel is to the network.")
    sec.networks = [("MLP 64-64-64-10, trained on all the training digits (recording epoch "
                     "checkpoints for TracIn)", res["test_accuracy"])]
    ok = [r for r in res["rows"] if np.isfinite(r.get("lds", np.nan))]
    best = max(ok, key=lambda r: r["lds"]) if ok else None
    sec.summary.append("LDS per method: " + ", ".join(f"{r['method']} {r['lds']:.3f}" for r in ok)
                       + (f"; the highest: {best['method']}." if best else "."))
    failed = [r for r in res["rows"] if "error" in r]
    if failed:
        sec.summary.append("Failed here: " + "; ".join(f"{r['method']} ({r['error']})" for r in failed) + ".")
    sec.data["lds"] = {r["method"]: r["lds"] for r in ok}
    sec.data["tau"] = {r["method"]: r["tau"] for r in res["rows"] if np.isfinite(r.get("tau", np.nan))}
    solvers = ", ".join(s.upper().replace("EKFAC", "EK-FAC") for s in SOLVERS[size])
    sec.text(f"The trak section's split and network ({cfg['n_train']} training, {cfg['n_test']} test "
             f"digits; LDS against the same {res['retrainer'].n_subsets} retrained models). TRAK-1 "
             f"runs on the network trained on all the data, TRAK-{M} on {M} models trained on random "
             f"halves. Influence functions: solver {solvers} at this size"
             + (" (CG with --full)." if "cg" not in SOLVERS[size] else ".")
             + " '-': not computed (HYDRA and Grad-Cos define no surrogate kernel here; "
             "iterative solvers would need one solve per training digit).")
    rows = []
    errors = any("error" in r or "tau_error" in r for r in res["rows"])
    for r in res["rows"]:
        lds = f"{r['lds']:.3f}" if np.isfinite(r.get("lds", np.nan)) else "-"
        tau = f"{r['tau']:.3f}" if np.isfinite(r.get("tau", np.nan)) else "-"
        note = [r.get("error") or r.get("tau_error") or ""] if errors else []
        rows.append([r["method"], lds, tau, f"{r['seconds']:.1f}"] + note)
    sec.table("LDS and surrogate fidelity per method", ["method", "LDS", "surrogate tau (KRR)",
                                                         "seconds"] + (["error"] if errors else []), rows)
    sec.figure(path, "LDS (blue) and the Kendall tau of a KRR surrogate on each method's kernel "
                     "(orange) per method; n/a: not computed.")
    return sec
