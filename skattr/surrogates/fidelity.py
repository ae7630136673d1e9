"""Fidelity of a surrogate to the network: Kendall tau, accuracy differential, sklearn scorers."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit, softmax
from scipy.stats import kendalltau
from sklearn.metrics import accuracy_score

__all__ = [
    "kendall_tau_fidelity",
    "accuracy_differential",
    "class_scores",
    "make_fidelity_scorer",
    "label_positions",
    "align_scores",
]


def _show(labels, k=10):
    labels = list(labels)
    return f"{labels[:k]}{' ...' if len(labels) > k else ''}"


def label_positions(y, labels, *, whose="network's"):
    """Position of each label of ``y`` in ``labels``, matched by value (not by sort order).

    Parameters
    ----------
    y : array-like of shape (n,)
        Labels, of any hashable type (integers, strings, ...).
    labels : array-like of shape (C,)
        The reference labels, e.g. a network's ``class_labels()`` or an estimator's ``classes_``.
    whose : str, default="network's"
        Names ``labels`` in the error message.

    Returns
    -------
    idx : ndarray of shape (n,), int

    Raises
    ------
    ValueError
        Naming the labels of ``y`` that are not among ``labels`` (``1`` and ``"1"`` differ).

    Examples
    --------
    >>> from skattr.surrogates import label_positions
    >>> label_positions(["b", "a", "b"], ["a", "b", "c"]).tolist()
    [1, 0, 1]
    """
    pos = {c: i for i, c in enumerate(np.asarray(labels).tolist())}
    yl = np.asarray(y).ravel().tolist()
    idx = np.array([pos.get(c, -1) for c in yl], dtype=np.intp)
    if np.any(idx < 0):
        bad = sorted({c for c, i in zip(yl, idx) if i < 0}, key=repr)
        raise ValueError(
            f"y contains labels {_show(bad, 5)} that are not among the {whose} classes "
            f"{_show(pos)}."
        )
    return idx


def align_scores(S, classes, labels):
    """An estimator's class scores with its columns placed at ``labels``' positions, by label.

    Parameters
    ----------
    S : array of shape (n, len(classes)) or (n,)
        Probability-like scores, one column per entry of ``classes`` (a 1-d array is a binary
        decision value for ``classes[1]``; it becomes the probabilities ``sigmoid(-S), sigmoid(S)``,
        which rank the same).
    classes : array-like
        The estimator's classes, in the order of the columns of ``S``.
    labels : array-like of shape (C,)
        The labels to align to (e.g. the network's ``class_labels()``).

    Returns
    -------
    S_aligned : ndarray of shape (n, C)
        Column ``c`` holds the score of label ``labels[c]``; 0 (probability zero) for a label the
        estimator does not have.  Columns of classes that are not among ``labels`` are dropped.
    missing : list
        The labels of ``labels`` the estimator does not have.

    Raises
    ------
    ValueError
        When no class of the estimator is among ``labels``.

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.surrogates import align_scores
    >>> S, missing = align_scores(np.array([[0.2, 0.8]]), [0, 2], [0, 1, 2])
    >>> S.tolist(), missing
    ([[0.2, 0.0, 0.8]], [1])
    """
    S = np.asarray(S, dtype=np.float64)
    classes = np.asarray(classes).tolist()
    if S.ndim == 1:
        if len(classes) != 2:
            raise ValueError(f"A 1-d score needs two classes, got {_show(classes)}.")
        p = expit(S)
        S = np.stack([1 - p, p], 1)
    if S.ndim != 2 or S.shape[1] != len(classes):
        raise ValueError(f"Scores of shape {S.shape} do not match the {len(classes)} classes {_show(classes)}.")
    labels = np.asarray(labels).tolist()
    col = {c: j for j, c in enumerate(classes)}
    if not any(c in col for c in labels):
        raise ValueError(
            f"The estimator's classes {_show(classes)} are not the network's: none of them among "
            f"the network's classes {_show(labels)}. Fidelity compares the probabilities of the "
            "same class; fit the estimator to the network's labels (or without y)."
        )
    out = np.zeros((S.shape[0], len(labels)))
    missing = []
    for i, c in enumerate(labels):
        if c in col:
            out[:, i] = S[:, col[c]]
        else:
            missing.append(c)
    return out, missing


def _pick(P, cls_idx):
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 1:
        return P
    if P.shape[1] == 2 and cls_idx is None:
        return P[:, 1]
    if cls_idx is None:
        raise ValueError("For more than two classes, pass the class index of each sample.")
    idx = np.asarray(cls_idx)
    integer = np.issubdtype(idx.dtype, np.integer)
    if idx.shape != (P.shape[0],) or not integer or (idx.size and (idx.min() < 0 or idx.max() >= P.shape[1])):
        got = f"shape {idx.shape}, dtype {idx.dtype}"
        if integer and idx.size:
            got += f", values in [{idx.min()}, {idx.max()}]"
        raise ValueError(
            f"classes must be {P.shape[0]} integer column indices in [0, {P.shape[1]}), got {got}; "
            "to pass labels, map them with label_positions(y, labels)."
        )
    return P[np.arange(P.shape[0]), idx]


def _warn_missing(missing, present, who="surrogate"):
    """Warn when labels to score are ones the estimator never saw in fitting."""
    miss = [c for c in missing if c in set(np.asarray(present).tolist())]
    if miss:
        warnings.warn(
            f"The {who} never saw the labels {_show(miss, 5)} in fitting (the network never "
            "predicted them on the fit set, or y lacked them): its probability for them is 0, "
            "which counts in the fidelity.",
            UserWarning,
            stacklevel=3,
        )


def fidelity_from_scores(P, S, labels, classes, y=None, who="surrogate"):
    """Kendall-tau fidelity of an estimator's scores ``S`` (columns ``classes``) to the network's
    probabilities ``P`` (columns ``labels``), matched by label.

    ``y`` (labels) picks the class of each sample; ``None`` the network's predicted class.  With
    two network classes, the probability of ``labels[1]`` is compared for every sample.
    """
    P = np.asarray(P, dtype=np.float64)
    labels = np.asarray(labels)
    if P.shape[1] != len(labels):
        raise ValueError(f"The network's probabilities have {P.shape[1]} columns for {len(labels)} classes.")
    Sa, missing = align_scores(S, classes, labels)
    if y is None:
        idx = P.argmax(1)
    else:
        idx = label_positions(y, labels)
    if P.shape[1] == 2:
        _warn_missing(missing, labels[1:], who)
        return kendall_tau_fidelity(P[:, 1], Sa[:, 1])
    _warn_missing(missing, labels[np.unique(idx)], who)
    return kendall_tau_fidelity(P, Sa, idx)


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
        Integer column indices (not labels: see :func:`label_positions`); an index outside
        ``[0, C)`` is a ``ValueError``.

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
    The estimator's columns are matched to the network's by label (its ``classes_`` against
    ``model.class_labels()``): a class it never saw has probability 0 (with a warning), and a
    label ``y`` unknown to the network is a ``ValueError`` naming it.

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
        labels = model.class_labels()
        # the estimator's columns are its classes_ (a pipeline's are its last step's); one
        # without classes_ is taken to score the network's classes in order
        classes = getattr(estimator, "classes_", None)
        if classes is None:
            classes = labels if np.ndim(S) == 2 else labels[-2:]
        return fidelity_from_scores(P, S, labels, classes, y, who="estimator")

    return scorer
