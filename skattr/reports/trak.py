"""Main-job section: TRAK, the linear datamodeling score, and concept attribution on digits.

Two studies, shared with ``benchmarks/trak_experiments.py`` (which runs them at full size and
adds the ``traker`` package side by side):

* :func:`lds_study`: LDS of TRAK with 1, 2, 5, 10 models (members trained on random halves) and
  of Grad-Cos, against ``n_subsets`` models retrained on random halves
  (:class:`skattr.metrics.SubsetRetrainer`).
* :func:`concept_study`: the concept "digit with a closed loop" (0, 6, 8, 9): linear probes per
  layer, TRAK attribution of the best layer's probe to the training set, and remove-and-retrain of
  the top-k attributed examples against k random ones.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ..estimators import GradCosKernel
from ..estimators.concept import ConceptProbe, remove_and_retrain
from ..estimators.trak import TRAK
from ..metrics import KernelAttribution, SubsetRetrainer
from ..model import TorchModel
from ..parallel import torch_threads

__all__ = [
    "trak_report",
    "lds_study",
    "concept_study",
    "make_mlp",
    "make_cnn",
    "digits_split",
    "plot_lds",
    "plot_concept",
    "lds_table",
    "concept_table",
    "CLOSED_LOOP",
]

CLOSED_LOOP = (0, 6, 8, 9)


def make_mlp(width=128, depth=2, n_classes=10, seed=0):
    """MLP 64-width-...-width-C with ReLUs (``depth`` hidden layers)."""
    torch.manual_seed(seed)
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, n_classes))


def make_cnn(n_classes=10, seed=0):
    """Small CNN on 1x8x8 digits: Conv 1->16 (3x3), Conv 16->32 (3x3, stride 2), Linear 512->C."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, n_classes),
    )


def digits_split(*, images=False, n_train=1000, n_test=200, random_state=0):
    """Stratified digits split: train, test and the rest (a probing set), scaled to [0, 1]."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if images:
        X = X.reshape(-1, 1, 8, 8)
    Xtr, Xo, ytr, yo = train_test_split(X, y, train_size=n_train, random_state=random_state, stratify=y)
    Xte, Xr, yte, yr = train_test_split(Xo, yo, train_size=n_test, random_state=random_state, stratify=yo)
    return Xtr, ytr, Xte, yte, Xr, yr


def template(module, *, epochs=30, lr=0.05, weight_decay=5e-4, batch_size=64, random_state=0):
    """The training recipe shared by every model of the studies (seeded SGD with momentum)."""
    return TorchModel(module, epochs=epochs, lr=lr, momentum=0.9, weight_decay=weight_decay,
                      batch_size=batch_size, random_state=random_state)


# ------------------------------------------------------------------------------------- LDS
def lds_study(model, Xtr, ytr, Xte, yte, *, n_subsets=50, ensembles=(1, 5, 10), dims=(2048,),
              ridge=1.0, gradcos=True, extra_dims=(), cache_dir=None, random_state=0, verbose=0,
              progress=None):
    """LDS of TRAK-M for every M in ``ensembles`` and projection_dim in ``dims``, and of Grad-Cos.

    Returns a dict: ``rows`` (method, n_models, projection_dim, lds, seconds), ``retrainer``,
    ``members`` (the largest ensemble's models, trained on random halves), ``full_model``
    (trained on the whole training set; Grad-Cos uses it) and ``trak`` (the fitted TRAK of the
    largest ensemble at the first projection size).  ``extra_dims`` adds skattr-only rows at
    further projection sizes (``None``: exact TRAK).  ``progress`` (a
    :class:`~skattr.reports.progress.Progress`) is told of 3 steps.
    """
    from .progress import ensure

    progress = ensure(progress)
    progress.step("trak", f"LDS ground truth: train {n_subsets} models on random halves")
    t0 = time.perf_counter()
    ret = SubsetRetrainer(model, n_subsets=n_subsets, cache_dir=cache_dir,
                          random_state=random_state, verbose=verbose).fit(Xtr, ytr)
    t_ret = time.perf_counter() - t0
    Mmax = max(ensembles)
    store = None if cache_dir is None else os.path.join(cache_dir, "trak_members")
    progress.step("trak", f"train {Mmax} TRAK member models on random halves")
    t0 = time.perf_counter()
    # members are seeded by index: the first M of a Mmax-ensemble are the M-ensemble
    big = TRAK(model, n_models=Mmax, projection_dim=8, store=store, random_state=random_state + 1,
               verbose=verbose)
    members = big.fit(Xtr, ytr).models_
    t_members = time.perf_counter() - t0
    progress.step("trak", f"TRAK with {', '.join(map(str, ensembles))} models, Grad-Cos: LDS")
    rows, fitted = [], None
    for k in tuple(dims) + tuple(extra_dims):
        for M in ensembles:
            t = time.perf_counter()
            tr = TRAK(model, models=members[:M], projection_dim=k, ridge=ridge,
                      random_state=random_state).fit(Xtr, ytr)
            lds = ret.score(tr, Xte, yte)
            rows.append({"method": f"skattr TRAK-{M}", "library": "skattr", "n_models": M,
                         "projection_dim": k, "ridge": ridge, "lds": lds,
                         "seconds": time.perf_counter() - t})
            if M == Mmax and fitted is None:
                fitted = tr
    full = clone(model).fit(Xtr, ytr)
    if gradcos:
        t = time.perf_counter()
        gc = KernelAttribution(GradCosKernel(full, labels="given")).fit(Xtr, ytr)
        rows.append({"method": "Grad-Cos (exact)", "library": "skattr", "n_models": 1,
                     "projection_dim": None, "ridge": None, "lds": ret.score(gc, Xte, yte),
                     "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    tr = TRAK(full, projection_dim=max(dims), ridge=ridge, random_state=random_state).fit(Xtr, ytr)
    rows.append({"method": "skattr TRAK-1 (full-data model)", "library": "skattr", "n_models": 1,
                 "projection_dim": max(dims), "ridge": ridge, "lds": ret.score(tr, Xte, yte),
                 "seconds": time.perf_counter() - t})
    return {"rows": rows, "retrainer": ret, "members": members, "full_model": full, "trak": fitted,
            "retrain_seconds": t_ret, "member_seconds": t_members,
            "test_accuracy": float(full.score(Xte, yte)),
            "member_accuracy": float(np.mean([m.score(Xte, yte) for m in members]))}


def lds_table(rows):
    lines = ["| method | models | projection_dim | ridge | LDS | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        k = "exact" if r["projection_dim"] is None else str(r["projection_dim"])
        ridge = "-" if r.get("ridge") is None else f"{r['ridge']:g}"
        lines.append(f"| {r['method']} | {r['n_models']} | {k} | {ridge} | {r['lds']:.3f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_lds(rows_by_arch, path):
    """LDS vs number of models, one panel per architecture, one line per (library, k)."""
    from .. import plotting

    plt = plotting._plt()
    archs = list(rows_by_arch)
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = rows_by_arch[arch]
        series = {}
        for r in rows:
            if r["method"].startswith(("skattr TRAK-", "traker")) and "full-data" not in r["method"]:
                k = "exact" if r["projection_dim"] is None else r["projection_dim"]
                name = re.sub(r"TRAK-\d+", "TRAK", r["method"]) + f", k={k}"
                series.setdefault(name, []).append((r["n_models"], r["lds"]))
        for name, pts in sorted(series.items()):
            pts = sorted(pts)
            style = "-o" if name.startswith("skattr") else ("--s" if "matched" in name else ":x")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, alpha=0.85)
        for r in rows:
            if r["method"].startswith("Grad-Cos"):
                ax.axhline(r["lds"], color="gray", ls=":", label=r["method"])
        ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
        ax.set_xlabel("number of models in the ensemble")
        ax.set_ylabel("LDS (Spearman, mean over test points)")
        ax.set_title(f"{arch} on digits", fontsize=10)
        ax.grid(alpha=0.3)
        # below the panel: a legend inside would cover the lines
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return plotting.save(fig, path)


# --------------------------------------------------------------------------------- concept
def concept_study(model, Xtr, ytr, Xprobe, yprobe, *, concept_digits=CLOSED_LOOP, layers=None,
                  fractions=(0.05, 0.1, 0.2), n_seeds=3, projection_dim=2048, ridge=1.0,
                  probe_C=0.1, penalty="l1", random_state=0, verbose=0, progress=None):
    """Probe the concept per layer, attribute the best probe with TRAK, remove and retrain.

    ``model`` is the training template; it is fitted on ``(Xtr, ytr)`` here.  The concept label of
    a sample is ``y in concept_digits``.  Returns a dict with ``probe`` (rows per layer before
    removal), ``best_layer``, ``scores`` (per training example: the mean TRAK score of the probe
    output over the concept-positive probing samples), ``top_concept_share`` (fraction of concept-positive examples
    among the top-k, per fraction, vs the base rate), and ``rar`` (the
    :func:`~skattr.estimators.concept.remove_and_retrain` result).
    """
    from .progress import ensure

    progress = ensure(progress)
    progress.step("trak", "concept: probes per layer, TRAK attribution of the best probe")
    c_tr = np.isin(ytr, concept_digits).astype(int)
    c_pr = np.isin(yprobe, concept_digits).astype(int)
    full = clone(model).fit(Xtr, ytr)
    probe_t = ConceptProbe(full, layers=layers, C=probe_C, penalty=penalty, random_state=random_state)
    probe = clone(probe_t).fit(Xprobe, c_pr)
    best = probe.best_layer_
    t = time.perf_counter()
    trak = TRAK(full, output=probe.output_function(best), projection_dim=projection_dim, ridge=ridge,
                random_state=random_state).fit(Xtr, c_tr)
    A = trak.attribute(Xprobe, c_pr)
    # how much each training example raises the probe's evidence for the concept where it is present
    scores = A[c_pr == 1].mean(0)
    t_attr = time.perf_counter() - t
    order = np.argsort(-scores)
    share = {f: float(c_tr[order[: int(round(f * len(c_tr)))]].mean()) for f in fractions}
    progress.step("trak", f"concept: remove the top {', '.join(f'{f:.0%}' for f in fractions)} and "
                  f"as many random examples, retrain ({n_seeds} seeds)")
    rar = remove_and_retrain(model, Xtr, ytr, c_tr, scores, fractions=fractions, n_seeds=n_seeds,
                             probe=probe_t, X_probe=Xprobe, concept_probe=c_pr,
                             random_state=random_state, verbose=verbose)
    return {"probe": probe.summary(), "best_layer": best, "chance": probe.chance_,
            "scores": scores, "top_concept_share": share, "base_rate": float(c_tr.mean()),
            "attribution_seconds": t_attr, "rar": rar, "layers": probe.layers_,
            "model_accuracy": float(full.score(Xprobe, yprobe))}


def concept_table(result):
    """Markdown: probe accuracy / sparsity per layer, baseline vs top-k vs random-k removal."""
    summ = result["rar"]["summary"]
    layers = result["layers"]
    lines = ["| condition | removed | " + " | ".join(f"acc {la}" for la in layers) + " | "
             + " | ".join(f"sparsity {la}" for la in layers) + " | best layer |",
             "|---|---|" + "---|" * (2 * len(layers) + 1)]
    keys = sorted({(s["condition"], s["fraction"]) for s in summ},
                  key=lambda t: ({"baseline": 0, "top": 1, "random": 2}[t[0]], t[1]))
    keys = sorted(keys, key=lambda t: (t[1], {"baseline": 0, "top": 1, "random": 2}[t[0]]))
    for cond, f in keys:
        sel = {s["layer"]: s for s in summ if s["condition"] == cond and s["fraction"] == f}
        acc = " | ".join(f"{sel[la]['accuracy_mean']:.3f}±{sel[la]['accuracy_std']:.3f}" for la in layers)
        sp = " | ".join(f"{sel[la]['sparsity_mean']:.2f}±{sel[la]['sparsity_std']:.2f}" for la in layers)
        b = sel[layers[0]]
        best = f"{b['best_layer']} ({b['best_layer_share']:.0%})"
        name = {"baseline": "baseline (full data)", "top": "top-k by TRAK", "random": "random-k"}[cond]
        lines.append(f"| {name} | {f:.0%} | {acc} | {sp} | {best} |")
    return "\n".join(lines)


def plot_concept(result, path, title="closed-loop concept"):
    """Probe accuracy and sparsity per layer: before removal, after top-k and after random-k."""
    from .. import plotting

    plt = plotting._plt()
    summ = result["rar"]["summary"]
    layers = result["layers"]
    fracs = sorted({s["fraction"] for s in summ if s["condition"] != "baseline"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(layers))
    for ax, key, ylabel in ((axes[0], "accuracy", "probe accuracy (held out)"),
                            (axes[1], "sparsity", "probe sparsity (fraction of zero weights)")):
        def curve(cond, f, key=key):
            sel = {s["layer"]: s for s in summ if s["condition"] == cond and s["fraction"] == f}
            return ([sel[la][f"{key}_mean"] for la in layers], [sel[la][f"{key}_std"] for la in layers])

        m, s = curve("baseline", 0.0)
        ax.errorbar(x, m, yerr=s, fmt="-o", color="black", label="before removal", capsize=3)
        cmap = plt.get_cmap("viridis")
        for i, f in enumerate(fracs):
            col = cmap(0.15 + 0.7 * i / max(1, len(fracs) - 1))
            m, s = curve("top", f)
            ax.errorbar(x + 0.04 * (i + 1), m, yerr=s, fmt="-s", color=col, capsize=3,
                        label=f"top {f:.0%} removed")
            if any(t["condition"] == "random" for t in summ):
                m, s = curve("random", f)
                ax.errorbar(x - 0.04 * (i + 1), m, yerr=s, fmt="--^", color=col, alpha=0.6,
                            capsize=3, label=f"random {f:.0%} removed")
        ax.set_xticks(x)
        ax.set_xticklabels([f"layer {la}" for la in layers])
        ax.set_xlabel("layer whose activations the probe reads")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "accuracy":
            ax.axhline(result["chance"], color="gray", ls=":", label="majority class")
            handles, labels = ax.get_legend_handles_labels()
    # one legend for both panels, below them (inside it would cover the points)
    fig.suptitle(f"{title}: probes per layer before / after remove-and-retrain "
                 f"(mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(labels) // 4), 1, 0.95))
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    return plotting.save(fig, path)


# ----------------------------------------------------------------------------- main job
#: training / test digits, LDS ground-truth models, ensemble sizes, projection size, concept
#: probing set, removed fractions and seeds, per run size.
SIZES = {
    "tiny": dict(n_train=150, n_test=40, n_subsets=6, ensembles=(1, 2), k=256, n_probe=150,
                 fractions=(0.2,), n_seeds=1),
    "quick": dict(n_train=300, n_test=60, n_subsets=10, ensembles=(1, 2, 5), k=1024, n_probe=300,
                  fractions=(0.2,), n_seeds=2),
    "default": dict(n_train=500, n_test=100, n_subsets=20, ensembles=(1, 2, 5, 10), k=1024,
                    n_probe=500, fractions=(0.1, 0.2), n_seeds=2),
    "full": dict(n_train=500, n_test=100, n_subsets=50, ensembles=(1, 2, 5, 10), k=1024,
                 n_probe=500, fractions=(0.1, 0.2), n_seeds=3),
}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    return 6


def report_split(size, random_state=0):
    """The digits split and training template the ``trak`` and ``attribution`` sections share
    (so their LDS ground truth is trained once, in ``OUT/cache``)."""
    cfg = SIZES[size]
    split = digits_split(n_train=cfg["n_train"], n_test=cfg["n_test"], random_state=random_state)
    # a short recipe (few, large steps): training dominates the cost of these sections
    model = template(make_mlp(64, 2, seed=random_state), epochs=15, lr=0.1, batch_size=128,
                     random_state=random_state)
    return split, model


def trak_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """The TRAK section of ``python -m skattr``: LDS vs number of models, top proponents, concept
    attribution.  Writes its PNGs to ``outdir``; returns a :class:`~skattr.reports.document.Section`.
    """
    os.makedirs(outdir, exist_ok=True)
    with torch_threads(1):  # tiny networks: extra threads only add synchronisation overhead
        return _report(outdir, random_state, size, progress, verbose)


def _report(outdir, random_state, size, progress, verbose):
    from .. import plotting
    from .document import Section
    from .progress import ensure

    progress = ensure(progress)
    cfg = SIZES[size]
    (Xtr, ytr, Xte, yte, Xr, yr), model = report_split(size, random_state)
    lds = lds_study(model, Xtr, ytr, Xte, yte, n_subsets=cfg["n_subsets"], ensembles=cfg["ensembles"],
                    dims=(cfg["k"],), ridge=1.0, random_state=random_state, verbose=verbose,
                    cache_dir=os.path.join(os.path.dirname(os.path.abspath(outdir)), "cache"),
                    progress=progress)
    Xp, yp = Xr[: cfg["n_probe"]], yr[: cfg["n_probe"]]
    conc = concept_study(model, Xtr, ytr, Xp, yp, layers=["1", "3", "4"], fractions=cfg["fractions"],
                         n_seeds=cfg["n_seeds"], projection_dim=cfg["k"], random_state=random_state,
                         verbose=verbose, progress=progress)
    progress.step("trak", "plots and examples")
    net = "MLP 64-64-64-10"
    sec = Section(
        "trak", "TRAK, LDS and concepts",
        "TRAK scores how much each training example raised the network's output (the margin of "
        "the true class) on a test input, from randomly projected gradients of one or several "
        "models; the LDS checks those scores against models actually retrained on random halves "
        "of the training set.")
    sec.networks = [(f"{net}, trained on all {cfg['n_train']} training digits", lds["test_accuracy"]),
                    (f"{net}, the TRAK members (each on a random half; mean)", lds["member_accuracy"])]
    trak_rows = [r for r in lds["rows"] if r["method"].startswith("skattr TRAK-") and "full" not in r["method"]]
    gc = [r for r in lds["rows"] if r["method"].startswith("Grad-Cos")]
    full1 = [r for r in lds["rows"] if "full-data" in r["method"]]
    sec.summary.append(
        "LDS of TRAK by number of models: "
        + ", ".join(f"{r['n_models']}: {r['lds']:.3f}" for r in trak_rows)
        + (f"; TRAK on the one network trained on all the data: {full1[0]['lds']:.3f}" if full1 else "")
        + (f"; Grad-Cos: {gc[0]['lds']:.3f}" if gc else "") + ".")
    share = conc["top_concept_share"]
    sec.summary.append(
        "Concept 'closed loop' (digits 0, 6, 8, 9): TRAK's top-ranked training digits for the concept "
        "probe are " + ", ".join(f"{s:.0%} closed-loop in the top {f:.0%}" for f, s in share.items())
        + f" (base rate {conc['base_rate']:.0%}).")
    sec.data.update({"lds": {r["method"].replace("skattr ", ""): r["lds"] for r in lds["rows"]},
                     "concept_top_share": {f"{f:g}": s for f, s in share.items()},
                     "concept_base_rate": conc["base_rate"]})
    sec.text(f"{cfg['n_train']} training and {cfg['n_test']} test digits; {net} (SGD, 15 epochs). "
             f"Ground truth: {lds['retrainer'].n_subsets} models retrained on random halves. TRAK-M "
             f"uses M models, each trained on its own random half; projection size k = {cfg['k']}.")
    rows = []
    for r in lds["rows"]:
        name = r["method"].replace("skattr ", "")
        if "full-data" in name:
            name = "TRAK-1, the network trained on all the data"
        elif name.startswith("TRAK-"):
            name += " (members on random halves)"
        rows.append([name, r["n_models"], "exact" if r["projection_dim"] is None else r["projection_dim"],
                     f"{r['lds']:.3f}", f"{r['seconds']:.1f}"])
    sec.table("LDS of TRAK and Grad-Cos", ["method", "models", "projection size k", "LDS", "seconds"], rows)
    path = plot_lds({net: lds["rows"]}, os.path.join(outdir, "lds_vs_models.png"))
    sec.figure(path, "LDS against the number of models in the TRAK ensemble (grey dotted: Grad-Cos).")
    # examples: the training digits TRAK ranks highest for a few test digits
    n_show, k_show = 5, 6
    top = lds["trak"].top_k(Xte[:n_show], yte[:n_show], k=k_show)
    fig = plotting.plot_top_k_images(Xte[:n_show], Xtr, top.proponents, image_shape=(8, 8),
                                     y_test=yte[:n_show], y_train=ytr)
    path = os.path.join(outdir, "trak_top_proponents.png")
    plotting.save(fig, path)
    same = float((ytr[lds["trak"].top_k(Xte, yte, k=5).proponents] == yte[:, None]).mean())
    sec.figure(path, f"Five test digits (left, red title: true label y) and the {k_show} training digits "
                     f"TRAK-{max(cfg['ensembles'])} ranks as most helpful (index #, label y). Over all "
                     f"{len(Xte)} test digits, {same:.0%} of the top-5 share the test digit's label.")
    sec.data["top5_same_label"] = same
    # the concept study, in words and one table
    sec.text(f"Concept attribution: a sparse linear probe reads 'closed loop' (digits 0, 6, 8, 9) from "
             f"each layer's activations on {len(Xp)} held-out digits; the best layer is "
             f"{conc['best_layer']}. TRAK attributes that probe's output to the training digits; "
             f"removing the top-ranked ones and retraining is compared with removing as many "
             f"random ones.")
    summ = conc["rar"]["summary"]
    crow = []
    for s_ in sorted(summ, key=lambda s: (s["fraction"], {"baseline": 0, "top": 1, "random": 2}[s["condition"]], s["layer"])):
        if s_["layer"] != conc["best_layer"]:
            continue
        cond = {"baseline": "no removal", "top": "top-ranked by TRAK removed", "random": "random removed"}[s_["condition"]]
        crow.append([cond, f"{s_['fraction']:.0%}", f"{s_['accuracy_mean']:.3f} ± {s_['accuracy_std']:.3f}",
                     f"{s_['sparsity_mean']:.2f} ± {s_['sparsity_std']:.2f}"])
    sec.table(f"Probe of layer {conc['best_layer']} after remove-and-retrain (mean ± std over seeds)",
              ["training set", "removed", "probe accuracy", "probe sparsity (share of zero weights)"], crow)
    path = plot_concept(conc, os.path.join(outdir, "concept_probes.png"))
    sec.figure(path, "Probe accuracy and sparsity per layer before removal, after removing TRAK's "
                     "top-ranked training digits and after removing as many random ones.")
    return sec
