"""Main-job section: representation tracing (Pfahler and Morik, 2021) on digits.

An MLP in the paper's form (no biases, batch norm without affine parameters) trained with plain
SGD; every Linear layer's weights decompose exactly over steps and examples, so each test digit's representation splits into contributions of the training
examples.  Reported: the share of each test digit's top-10 proponents that carry its own class,
how often the class with the largest summed influence is the digit's own (per layer), the
decomposition residual, and the class ridge, influence-over-time and top-proponent plots.
``benchmarks/bench_representation.py --class-agreement`` runs the larger table.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .. import plotting
from ..estimators import RepresentationTracer
from ..model import TorchModel
from .document import Section
from .progress import ensure

__all__ = ["representation_report", "SIZES", "n_steps"]

SIZES = {
    "tiny": dict(n_train=150, n_test=60, width=32, epochs=10),
    "quick": dict(n_train=400, n_test=150, width=64, epochs=5),
    "default": dict(n_train=600, n_test=200, width=64, epochs=10),
    "full": dict(n_train=1000, n_test=300, width=64, epochs=30),
}


def n_steps(size):
    """Progress steps of this section at ``size``."""
    return 3


def representation_report(outdir, *, random_state=0, size="default", progress=None, verbose=0):
    """Trace an MLP's representations to its training examples; returns a :class:`Section`."""
    from ..datasets import load_digits_images

    progress = ensure(progress)
    cfg = SIZES[size]
    os.makedirs(outdir, exist_ok=True)
    seed = int(random_state)
    X, y = load_digits_images(as_images=False)
    perm = np.random.RandomState(seed).permutation(len(X))
    tr, te = perm[: cfg["n_train"]], perm[cfg["n_train"]: cfg["n_train"] + cfg["n_test"]]
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    w = cfg["width"]
    name = f"MLP 64-{w}-{w}-10"
    progress.step("representation", f"train {name} with plain SGD on {len(Xtr)} digits, "
                  "recording every step's per-example factors")
    torch.manual_seed(seed)
    # the paper's form: no biases and batch norm without affine parameters, so the Linear
    # layers' weights are all there is to trace (with biases the last layer's ranking follows
    # the loss-gradient size more than the class: benchmarks/README.md, representation tracing)
    net = nn.Sequential(nn.Linear(64, w, bias=False), nn.BatchNorm1d(w, affine=False), nn.ReLU(),
                        nn.Linear(w, w, bias=False), nn.BatchNorm1d(w, affine=False), nn.ReLU(),
                        nn.Linear(w, 10, bias=False))
    model = TorchModel(net, epochs=cfg["epochs"], lr=0.1, momentum=0.0, batch_size=32,
                       random_state=seed)
    tracer = RepresentationTracer(model).fit(Xtr, ytr)
    acc = float(tracer.model_.score(Xte, yte))
    progress.step("representation", f"attribute {len(Xte)} test digits, layer by layer")
    top = tracer.top_k(Xte, k=10)
    same = ytr[top.proponents] == yte[:, None]
    last_name = tracer.layers_[-1]
    same_last = ytr[tracer.top_k(Xte, k=10, layer=last_name).proponents] == yte[:, None]
    n_cls = min(len(Xte), 100)
    stats = tracer.class_statistics(Xte[:n_cls])
    own = {layer: float((s["classes"][s["influence_by_class"].argmax(1)] == yte[:n_cls]).mean())
           for layer, s in stats.items()}
    resid = max(float(np.max(r)) for r in tracer.decomposition_residual(Xte[:n_cls]).values())
    sec = Section(
        "representation", "Representation tracing",
        "Under plain SGD each layer's weights are the initial weights plus one update per "
        "(step, training example); representation tracing splits a test input's representation "
        "at a layer into those updates' contributions, so each training example gets an "
        "influence on it.")
    sec.networks = [(f"{name} (bias-free, batch norm without affine; plain SGD, lr 0.1, "
                     f"{cfg['epochs']} epochs)", acc)]
    last = list(stats)[-1]
    sec.summary.append(
        f"{same_last.mean():.0%} of each test digit's 10 most influential training digits in the "
        f"last layer (the paper's ranking; {same.mean():.0%} with the layers summed) carry its "
        f"own class; in the last layer the class with the largest summed influence is the "
        f"digit's own for {own[last]:.0%} of the test digits (chance 10%).")
    sec.data.update({"top10_same_class": float(same.mean()),
                     "top10_same_class_last_layer": float(same_last.mean()), "own_class_dominates": own,
                     "max_decomposition_residual": resid,
                     "weight_residual": {k: float(v) for k, v in tracer.weight_residual_.items()}})
    sec.text(f"{len(Xtr)} training and {len(Xte)} test digits. The contributions of all training "
             f"examples add up to each representation: the largest relative residual over the "
             f"traced layers is {resid:.1e} (float32 rounding).")
    sec.table("Agreement of the traced influence with the classes", [
        "traced layer", "own class has the largest summed influence", "layer width"],
        [[f"{layer} ({'output' if layer == last else 'hidden'})", f"{own[layer]:.2f}",
          str(tracer.model_.network()[int(layer)].out_features)] for layer in stats])
    sec.table("Class of the top-10 proponents", [
        "measure", "last layer (the paper's ranking)", "layers summed"], [
        ["share of proponents with the test digit's class", f"{same_last.mean():.3f}", f"{same.mean():.3f}"],
        ["test digits whose 10 proponents all share its class", f"{same_last.all(1).mean():.3f}",
         f"{same.all(1).mean():.3f}"],
        ["test digits where most proponents share its class",
         f"{(same_last.mean(1) > 0.5).mean():.3f}", f"{(same.mean(1) > 0.5).mean():.3f}"]])
    progress.step("representation", "plots")
    plt = plotting._plt()
    n_show = 4
    fig = plotting.plot_top_k_images(Xte[:n_show], Xtr, top.proponents[:n_show, :6], image_shape=(8, 8),
                                     y_test=yte[:n_show], y_train=ytr)
    path = os.path.join(outdir, "top_proponents.png")
    plotting.save(fig, path)
    sec.figure(path, "Four test digits (left, red title) and the six training digits whose updates "
                     "contributed most to their representation (index #, label y).")
    pred = tracer.model_.predict(Xte[:1])[0]
    layers = list(stats)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        plotting.plot_class_ridge(stats[layer], 0, predicted=pred, ax=ax,
                                  title=f"layer {layer}: test digit 0 (true {yte[0]}, predicted {pred})")
    path = os.path.join(outdir, "class_ridge.png")
    plotting.save(fig, path)
    sec.figure(path, "For the first test digit, per traced layer and per class of the training "
                     "examples: the distribution of the cosine between each contribution and the "
                     "representation, weighted by the contribution's size (the predicted class in "
                     "red). A class that built the representation is tall near cosine 1.")
    steps, over_time = tracer.influence_over_time(Xte[:1])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    plotting.plot_influence_over_time(steps, over_time, 0, ax=ax,
                                      title=f"test digit 0 (true {yte[0]}): influence accumulated per layer")
    path = os.path.join(outdir, "influence_over_time.png")
    plotting.save(fig, path)
    sec.figure(path, "Cumulative influence of the training steps on the first test digit's "
                     "representation, per layer; each curve ends at the norm of the layer's "
                     "learned change of that representation.")
    return sec
