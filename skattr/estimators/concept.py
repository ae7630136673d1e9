"""Concept attribution (Konz et al., 2023): linear concept probes and remove-and-retrain.

A *concept* is a binary property of inputs (e.g. "digit with a closed loop": 0, 6, 8, 9).
:class:`ConceptProbe` fits one linear probe (sklearn ``LogisticRegression``, L1 or L2) per layer on
the network's activations and reports where the concept is linearly decodable (probe accuracy on
held-out samples) and how sparse its code is.  :meth:`ConceptProbe.output_function` freezes a
probe into a TRAK model-output function: the signed probe logit ``(2c - 1) (w . h_l(x) + b)``
composed with the network up to layer ``l``, whose reweighting term ``Q = 1 - sigmoid(margin)``
matches the probe's logistic loss.  TRAK then attributes the concept to training examples, and
:func:`remove_and_retrain` checks the attribution counterfactually: drop the top-k attributed
training examples (and, as a control, k random ones), retrain, re-probe every layer.
"""

from __future__ import annotations

import copy
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._validation import check_input, seed_from_random_state
from ..ensemble import train_models
from ..model import TorchModel
from ..outputs import ProbeOutput, _concept_labels

__all__ = ["ConceptProbe", "ProbeOutput", "remove_and_retrain", "default_layers"]

_ACTIVATIONS = (
    torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh,
    torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.Mish, torch.nn.Hardtanh, torch.nn.ReLU6,
)


def default_layers(net):
    """Names of the network's activation modules (or, if none, of its Linear / Conv layers)."""
    names = [n for n, m in net.named_modules() if n and isinstance(m, _ACTIVATIONS)]
    if not names:
        names = [
            n for n, m in net.named_modules()
            if n and isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
        ]
    if not names:
        raise ValueError("The network has no activation, Linear or Conv module; pass layers=.")
    return names


# ==========================================================================================
# probes
# ==========================================================================================
class ConceptProbe(BaseEstimator):
    """Linear probes for a binary concept on several layers of a network.

    ``fit(X, concept)`` extracts each layer's activations (flattened), splits the samples into a
    probe-training and a held-out part (stratified), standardises, and fits an L1- or
    L2-penalised logistic regression per layer.

    Parameters
    ----------
    model : TorchModel
        The trained network.
    layers : list of str, default=None
        Module names to probe (their outputs); default: every activation module
        (:func:`default_layers`).
    C : float, default=0.1
        Inverse regularisation strength of the probes.
    penalty : {"l1", "l2"}, default="l1"
        L1 gives sparse probes (sparsity is the fraction of zero weights).
    test_size : float in (0, 1), default=0.3
        Held-out fraction for the probe accuracy.
    max_iter : int, default=2000
    tol : float, default=1e-4
        Weights with ``|w| <= tol * max|w|`` count as zero in ``sparsity_``.
    random_state : int, RandomState instance or None, default=0

    Attributes
    ----------
    layers_ : list of str
    probes_ : dict layer -> (StandardScaler, LogisticRegression)
    accuracy_ : dict layer -> float, held-out probe accuracy
    train_accuracy_ : dict layer -> float
    sparsity_ : dict layer -> float, fraction of (near-)zero probe weights
    n_active_ : dict layer -> int, number of non-zero weights
    n_dims_ : dict layer -> int, activation dimension
    best_layer_ : str, the layer with the highest held-out accuracy
    chance_ : float, accuracy of always predicting the majority concept label

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.concept import ConceptProbe
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0).fit(X, y)
    >>> probe = ConceptProbe(model).fit(X, np.isin(y, [0, 6, 8, 9]))
    >>> probe.layers_, probe.accuracy_["1"] > 0.8
    (['1'], True)
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "layers": [list, tuple, None],
        "C": [Interval(numbers.Real, 0, None, closed="neither")],
        "penalty": [StrOptions({"l1", "l2"})],
        "test_size": [Interval(numbers.Real, 0, 1, closed="neither")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self, model, *, layers=None, C=0.1, penalty="l1", test_size=0.3, max_iter=2000, tol=1e-4,
        random_state=0,
    ):
        self.model = model
        self.layers = layers
        self.C = C
        self.penalty = penalty
        self.test_size = test_size
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def __sklearn_clone__(self):
        params = self.get_params(deep=False)
        return type(self)(**{k: copy.deepcopy(v) if k == "model" else clone(v, safe=False)
                             for k, v in params.items()})

    def _make_clf(self):
        seed = seed_from_random_state(self.random_state)
        if self.penalty == "l1":
            return LogisticRegression(C=self.C, l1_ratio=1.0, solver="liblinear",
                                      max_iter=self.max_iter, random_state=seed)
        return LogisticRegression(C=self.C, l1_ratio=0.0, solver="lbfgs", max_iter=self.max_iter)

    def _acts(self, X, layer):
        return self.model.activations(X, layer).reshape(X.shape[0], -1).astype(np.float64)

    def fit(self, X, concept):
        """Fit one probe per layer.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        concept : array-like of shape (n_samples,)
            Binary concept labels (0/1 or bool).
        """
        self._validate_params()
        if not isinstance(self.model, TorchModel):
            raise TypeError(f"model must be a skattr.TorchModel, got {type(self.model).__name__}.")
        X = check_input(X)
        c = _concept_labels(concept, X.shape[0])
        if len(np.unique(c)) < 2:
            raise ValueError("concept has a single value; a probe needs both concept labels.")
        self.model.prepare(X[:1])
        net = self.model.network()
        self.layers_ = list(self.layers) if self.layers is not None else default_layers(net)
        mods = dict(net.named_modules())
        bad = [layer for layer in self.layers_ if layer not in mods]
        if bad:
            raise ValueError(f"No submodule named {bad[0]!r}; available: {[n for n in mods if n][:20]}.")
        seed = seed_from_random_state(self.random_state)
        idx_tr, idx_te = train_test_split(
            np.arange(X.shape[0]), test_size=self.test_size, stratify=c, random_state=seed
        )
        self.chance_ = float(max(c[idx_te].mean(), 1 - c[idx_te].mean()))
        self.probes_, self.accuracy_, self.train_accuracy_ = {}, {}, {}
        self.sparsity_, self.n_active_, self.n_dims_ = {}, {}, {}
        for layer in self.layers_:
            A = self._acts(X, layer)
            scaler = StandardScaler().fit(A[idx_tr])
            clf = self._make_clf()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(scaler.transform(A[idx_tr]), c[idx_tr])
            self.probes_[layer] = (scaler, clf)
            self.accuracy_[layer] = float(clf.score(scaler.transform(A[idx_te]), c[idx_te]))
            self.train_accuracy_[layer] = float(clf.score(scaler.transform(A[idx_tr]), c[idx_tr]))
            w = np.abs(clf.coef_.ravel())
            thr = self.tol * w.max() if w.max() > 0 else 0.0
            active = int(np.sum(w > thr))
            self.n_active_[layer] = active
            self.n_dims_[layer] = int(w.shape[0])
            self.sparsity_[layer] = 1.0 - active / w.shape[0]
        self.best_layer_ = max(self.layers_, key=lambda k: (self.accuracy_[k], -self.layers_.index(k)))
        self.n_features_in_ = int(X.shape[1])
        return self

    def decision_function(self, X, layer=None):
        """Probe logits ``w . standardise(h_l(x)) + b`` on ``layer`` (default: the best), (n,)."""
        check_is_fitted(self, "probes_")
        layer = self.best_layer_ if layer is None else layer
        if layer not in self.probes_:
            raise ValueError(f"No probe on layer {layer!r}; probed layers: {self.layers_}.")
        X = check_input(X)
        scaler, clf = self.probes_[layer]
        return clf.decision_function(scaler.transform(self._acts(X, layer)))

    def predict(self, X, layer=None):
        return (self.decision_function(X, layer) > 0).astype(np.int64)

    def score(self, X, concept, layer=None):
        """Probe accuracy on ``(X, concept)`` at ``layer`` (default: the best layer)."""
        c = _concept_labels(concept, np.asarray(X).shape[0] if not isinstance(X, torch.Tensor) else X.shape[0])
        return float(np.mean(self.predict(X, layer) == c))

    def output_function(self, layer=None):
        """The frozen probe on ``layer`` (default: the best) as a TRAK :class:`ProbeOutput`.

        Use it as ``TRAK(model, output=probe.output_function(layer)).fit(X_train, concept_train)``
        and attribute with concept labels: ``trak.attribute(X_probe, concept_probe)``.
        """
        check_is_fitted(self, "probes_")
        layer = self.best_layer_ if layer is None else layer
        if layer not in self.probes_:
            raise ValueError(f"No probe on layer {layer!r}; probed layers: {self.layers_}.")
        scaler, clf = self.probes_[layer]
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        w = clf.coef_.ravel() / scale
        b = float(clf.intercept_[0] - np.dot(w, scaler.mean_))
        return ProbeOutput(layer, w, b)

    def summary(self):
        """One dict per layer: layer, accuracy, train_accuracy, sparsity, n_active, n_dims."""
        check_is_fitted(self, "probes_")
        return [
            {
                "layer": layer, "accuracy": self.accuracy_[layer],
                "train_accuracy": self.train_accuracy_[layer], "sparsity": self.sparsity_[layer],
                "n_active": self.n_active_[layer], "n_dims": self.n_dims_[layer],
            }
            for layer in self.layers_
        ]


# ==========================================================================================
# remove and retrain
# ==========================================================================================
def remove_and_retrain(
    model, X, y, concept, scores, *, fractions=(0.05, 0.1, 0.2), n_seeds=3, probe=None,
    X_probe=None, concept_probe=None, controls=True, random_state=0, n_jobs=None, verbose=0,
):
    """Counterfactual check of a concept attribution: remove top-k vs random-k and retrain.

    For every fraction ``f`` and seed: remove the ``k = round(f n)`` training examples with the
    highest ``scores`` (and, as a control, ``k`` random ones), retrain a clone of ``model`` on the
    rest (``sklearn.base.clone(model).set_params(random_state=seed).fit``), re-probe every layer
    and record the concept's best layer, probe accuracy and sparsity.  A baseline retrains on the
    full set with the same seeds.

    Parameters
    ----------
    model : TorchModel
        Template (its training settings are reused; fitted weights are ignored).
    X, y : training set the scores refer to.
    concept : array-like of shape (n_train,)
        Binary concept labels of the training set (used for probing when ``X_probe`` is None).
    scores : array-like of shape (n_train,)
        Attribution of the concept to each training example (e.g. the mean over probe samples of
        TRAK scores for a :class:`ProbeOutput`); the highest are removed first.
    fractions : sequence of float in (0, 1), default=(0.05, 0.1, 0.2)
    n_seeds : int, default=3
        Retraining seeds per condition (the same seeds for every condition).
    probe : ConceptProbe, default=None
        Template whose parameters (layers, C, penalty...) are used to re-probe; default
        ``ConceptProbe(model)``.
    X_probe, concept_probe : default=None
        Probing set (held-out data is best); default the training set.
    controls : bool, default=True
        Also remove k random examples.
    random_state : int, RandomState instance or None, default=0
    n_jobs : int or None, default=None
        Models retrained in parallel (:func:`skattr.ensemble.train_models`).
    verbose : int, default=0

    Returns
    -------
    result : dict
        ``"rows"``: one dict per (condition, fraction, seed, layer) with keys condition
        ("baseline", "top", "random"), fraction, k, seed, layer, accuracy, sparsity, n_active,
        best_layer, model_accuracy (on the retained training set); ``"summary"``: one dict per
        (condition, fraction, layer) with the mean and std over seeds and the most frequent best
        layer; ``"removed"``: the indices removed as top-k per fraction.

    Examples
    --------
    See ``benchmarks/trak_experiments.py`` in the source repository and the documentation's
    TRAK page (``trak.html``).
    """
    X = check_input(X)
    n = X.shape[0]
    y = np.asarray(y)
    c = _concept_labels(concept, n)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"scores has {s.shape[0]} entries but X has {n} training examples.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contains NaN or infinity.")
    fr = [float(f) for f in fractions]
    if any(not 0 < f < 1 for f in fr):
        raise ValueError(f"fractions must lie in (0, 1), got {fr}.")
    if X_probe is None:
        X_probe, c_probe = X, c
    else:
        X_probe = check_input(X_probe)
        c_probe = _concept_labels(concept_probe, X_probe.shape[0])
    template = probe if probe is not None else ConceptProbe(model)
    base_seed = seed_from_random_state(random_state)
    rng = np.random.default_rng(base_seed)
    seeds = [int(v) for v in rng.integers(0, 2**31 - 1, size=int(n_seeds))]
    order = np.argsort(-s, kind="stable")

    jobs = [("baseline", 0.0, np.zeros(0, dtype=np.int64))]
    removed = {}
    for f in fr:
        k = int(round(f * n))
        removed[f] = order[:k]
        jobs.append(("top", f, order[:k]))
        if controls:
            jobs.append(("random", f, None))
    # every (condition, seed) model through the shared retraining harness, then probed
    subsets, seed_list, conds = [], [], []
    for cond, f, drop in jobs:
        for si, seed in enumerate(seeds):
            if cond == "random":
                k = int(round(f * n))
                drop = np.random.default_rng([base_seed, si, int(f * 1e6)]).choice(n, k, replace=False)
            subsets.append(np.setdiff1d(np.arange(n), drop))
            seed_list.append(seed)
            conds.append((cond, f, int(len(drop))))
    models = train_models(model, X, y, subsets, seed_list, n_jobs=n_jobs, verbose=verbose,
                          desc="remove and retrain")
    rows = []
    for m, keep, seed, (cond, f, k) in zip(models, subsets, seed_list, conds):
        pr = clone(template).set_params(model=m)
        pr.fit(X_probe, c_probe)
        acc_m = float(m.score(X[keep], y[keep]))
        for layer in pr.layers_:
            rows.append({
                "condition": cond, "fraction": f, "k": k, "seed": seed,
                "layer": layer, "accuracy": pr.accuracy_[layer],
                "sparsity": pr.sparsity_[layer], "n_active": pr.n_active_[layer],
                "best_layer": pr.best_layer_, "model_accuracy": acc_m,
            })
    return {"rows": rows, "summary": summarize_rows(rows), "removed": removed, "seeds": seeds}


def summarize_rows(rows):
    """Mean / std over seeds per (condition, fraction, layer), and the modal best layer."""
    from collections import Counter, defaultdict

    groups = defaultdict(list)
    for r in rows:
        groups[(r["condition"], r["fraction"], r["layer"])].append(r)
    out = []
    for (cond, f, layer), rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs])
        sp = np.array([r["sparsity"] for r in rs])
        best = Counter(r["best_layer"] for r in rs).most_common(1)[0][0]
        out.append({
            "condition": cond, "fraction": f, "layer": layer, "n_seeds": len(rs),
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
            "sparsity_mean": float(sp.mean()), "sparsity_std": float(sp.std()),
            "best_layer": best,
            "best_layer_share": float(np.mean([r["best_layer"] == best for r in rs])),
        })
    return out
