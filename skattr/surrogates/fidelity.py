"""Fidelity of a surrogate to the network: Kendall tau, accuracy differential, sklearn scorers."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from scipy.stats import kendalltau
from sklearn.metrics import accuracy_score

__all__ = [
    "kendall_tau_fidelity",
    "accuracy_differential",
    "class_scores",
    "make_fidelity_scorer",
]


def _pick(P, cls_idx):
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 1:
        return P
    if P.shape[1] == 2 and cls_idx is None:
        return P[:, 1]
    if cls_idx is None:
        raise ValueError("For more than two classes, pass the class index of each sample.")
    return P[np.arange(P.shape[0]), np.asarray(cls_idx)]


def kendall_tau_fidelity(network_proba, surrogate_scores, classes=None):
    """Kendall tau between the network's and the surrogate's probability of a class.

    The eNTK paper's fidelity: over test points, the rank correlation between the network's
    softmax probability and the surrogate's score, both for the true class (``classes``, as
    column indices; for two columns and ``classes=None``, class 1).  Points where the network's
    probability is exactly 0 or 1 are dropped.  Scores may be any monotone transform of a
    probability (e.g. an SVM's decision value): tau is rank-based.

    Parameters
    ----------
    network_proba : array of shape (n,) or (n, C)
    surrogate_scores : array of shape (n,) or (n, C)
    classes : array of shape (n,) of column indices, default=None

    Returns
    -------
    tau : float

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.surrogates import kendall_tau_fidelity
    >>> p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    >>> float(kendall_tau_fidelity(p, p[:, 1] * 10))
    1.0
    """
    a = _pick(network_proba, classes)
    b = _pick(surrogate_scores, classes)
    if a.shape != b.shape:
        raise ValueError(f"network and surrogate scores differ in shape: {a.shape} vs {b.shape}.")
    keep = (a > 0) & (a < 1) & np.isfinite(b)
    if keep.sum() < 2:
        raise ValueError("Fewer than two points with a network probability strictly in (0, 1).")
    return float(kendalltau(a[keep], b[keep]).statistic)


def accuracy_differential(y_true, y_surrogate, y_network):
    """Surrogate test accuracy minus network test accuracy (the paper's differential).

    Examples
    --------
    >>> from skattr.surrogates import accuracy_differential
    >>> accuracy_differential([0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0])
    -0.25
    """
    return float(accuracy_score(y_true, y_surrogate) - accuracy_score(y_true, y_network))


def class_scores(estimator, X):
    """Probability-like scores (n, C) of a fitted classifier or pipeline, or (n,) if binary.

    ``predict_proba`` when it exists, else the softmax of ``decision_function`` (a binary
    decision value is returned as is: it ranks like the class-1 probability).
    """
    if hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X)
        except AttributeError:  # e.g. SVC(probability=False) exposes the method but refuses
            pass
    d = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if d.ndim == 1:
        return d
    return softmax(d, axis=1)


def make_fidelity_scorer(model):
    """An sklearn scorer: Kendall-tau fidelity of an estimator to ``model`` (a TorchModel).

    Use it as ``GridSearchCV(..., scoring=make_fidelity_scorer(model))``; it scores the fitted
    estimator's class scores on the fold's ``X`` against ``model.predict_proba(X)``, for the true
    class ``y`` (class 1 for binary problems; the network's predicted class if ``y`` is None).

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.svm import SVC
    >>> from skattr import TorchModel
    >>> from skattr.estimators import TraceNTK
    >>> from skattr.surrogates import make_fidelity_scorer
    >>> X, y = load_digits(n_class=3, return_X_y=True)
    >>> X = (X[:150] / 16).astype("float32"); y = y[:150]
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> model = TorchModel(net, epochs=3, random_state=0).fit(X, y)
    >>> pipe = make_pipeline(TraceNTK(model, projection_dim=64), SVC(kernel="precomputed"))
    >>> search = GridSearchCV(pipe, {"tracentk__projection_dim": [32, 64]}, cv=2,
    ...                       scoring=make_fidelity_scorer(model)).fit(X, y)
    >>> bool(-1 <= search.best_score_ <= 1)
    True
    """

    def scorer(estimator, X, y=None):
        P = model.predict_proba(X)
        S = class_scores(estimator, X)
        if P.shape[1] == 2:
            return kendall_tau_fidelity(P[:, 1], S if np.ndim(S) == 1 else S[:, -1])
        classes = model.class_labels()
        if y is None:
            idx = P.argmax(1)
        else:
            idx = np.searchsorted(classes, np.asarray(y))
        return kendall_tau_fidelity(P, S, idx)

    return scorer
