"""Attribution quality: the linear datamodeling score (LDS), its retraining harness, mislabel AUC.

The **linear datamodeling score** (Park et al., 2023) measures how well attribution scores
``tau(x, z_i)`` predict the effect of training on a subset: train ``M`` models on random subsets
``S_m`` (half of the training set, seeded), and for every test point ``x`` take the Spearman
correlation over ``m`` between the model output ``f(x; theta_{S_m})`` and the additive prediction
``sum_{i in S_m} tau(x, z_i)``; the LDS is its mean over test points.

:class:`SubsetRetrainer` trains and caches the ``M`` subset models once (``clone(model).fit``), so
one harness scores any number of attribution methods; with ``cache_dir`` it persists models and
outputs with joblib across sessions.  :func:`linear_datamodeling_score` takes an attribution
matrix or any fitted attribution estimator (``attribute(X, y)``), and :func:`make_lds_scorer`
turns the harness into an sklearn scorer so ``GridSearchCV`` can tune TRAK's ``projection_dim``,
``ridge`` or ``n_models`` by LDS.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import joblib
import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, clone
from sklearn.metrics import roc_auc_score
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._fingerprint import config_key, data_hash, template_hash
from ._validation import check_input, seed_from_random_state
from .ensemble import train_models
from .model import TorchModel
from .outputs import make_output, output_values

__all__ = [
    "SubsetRetrainer",
    "KernelAttribution",
    "linear_datamodeling_score",
    "lds_from_outputs",
    "make_lds_scorer",
    "mislabel_detection_auc",
]


def _rank_columns(A):
    return rankdata(A, axis=0)


def lds_from_outputs(attributions, masks, outputs, *, return_per_sample=False):
    """LDS from an attribution matrix, subset masks and the subset models' outputs.

    Parameters
    ----------
    attributions : array of shape (n_test, n_train)
    masks : array of shape (n_subsets, n_train) of bool
        ``masks[m, i]``: training example ``i`` is in subset ``m``.
    outputs : array of shape (n_subsets, n_test)
        Output of the model trained on subset ``m`` for each test point.
    return_per_sample : bool, default=False
        Also return the Spearman correlation of each test point (NaN where either side is
        constant over subsets).

    Returns
    -------
    lds : float
        Mean Spearman correlation over test points (NaN ones ignored).
    per_sample : ndarray of shape (n_test,), if ``return_per_sample``

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.metrics import lds_from_outputs
    >>> rng = np.random.default_rng(0)
    >>> tau = rng.normal(size=(3, 20)); masks = rng.random((30, 20)) < 0.5
    >>> outputs = (masks @ tau.T) * 2 + 1          # exactly additive: LDS = 1
    >>> float(lds_from_outputs(tau, masks, outputs))
    1.0
    """
    A = np.asarray(attributions, dtype=np.float64)
    masks = np.asarray(masks)
    Y = np.asarray(outputs, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"attributions must be 2-D (n_test, n_train), got shape {A.shape}.")
    if masks.ndim != 2 or masks.shape[1] != A.shape[1]:
        raise ValueError(
            f"attributions cover {A.shape[1]} training examples but the subset masks cover "
            f"{masks.shape[1] if masks.ndim == 2 else masks.shape}: were they computed on the same "
            "training set?"
        )
    if Y.shape != (masks.shape[0], A.shape[0]):
        raise ValueError(
            f"outputs must have shape (n_subsets, n_test) = {(masks.shape[0], A.shape[0])}, got {Y.shape}."
        )
    if not np.all(np.isfinite(A)):
        raise ValueError("attributions contain NaN or infinity.")
    pred = masks.astype(np.float64) @ A.T  # (M, n_test)
    rp, ry = _rank_columns(pred), _rank_columns(Y)
    rp -= rp.mean(0)
    ry -= ry.mean(0)
    den = np.sqrt((rp**2).sum(0) * (ry**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (rp * ry).sum(0) / np.where(den > 0, den, 1), np.nan)
    lds = float(np.nanmean(rho)) if np.any(np.isfinite(rho)) else float("nan")
    return (lds, rho) if return_per_sample else lds


class SubsetRetrainer(BaseEstimator):
    """The LDS ground truth: ``n_subsets`` models trained on random subsets of the training set.

    ``fit(X_train, y_train)`` draws the subsets (seeded) and trains ``clone(model)`` on each;
    :meth:`outputs` evaluates the subset models on test points (cached per test set), and
    :meth:`score` computes the LDS of an attribution matrix or estimator.  With ``cache_dir``
    trained models and outputs are persisted with joblib under
    ``cache_dir/<hash of the settings and data>/`` and reloaded by later runs (an interrupted
    run resumes model by model).

    Parameters
    ----------
    model : TorchModel
        Template; its training settings are reused for every subset model.
    n_subsets : int, default=50
    fraction : float in (0, 1), default=0.5
        Fraction of the training set in each subset.
    output : "margin", "logit", "loss", class label or callable, default="margin"
        The model output whose change is measured; use the same output as the attribution
        (``"loss"`` for TracIn, influence functions and HYDRA, whose default output is the
        loss).  With ``"loss"`` the LDS correlates the scores with ``-loss``, since attributions
        of the loss are signed so that positive means the training example lowered it.  For
        regression, ``"margin"`` does not exist: use ``"logit"`` with TRAK and ``"loss"`` with
        the loss-based methods.
    reseed : bool, default=True
        Train each subset model from its own seed (the usual LDS protocol).  ``False`` keeps
        ``model.random_state`` for every subset, which removes initialisation noise from the
        ground truth (only the data changes).
    cache_dir : str, path-like or None, default=None
    random_state : int, RandomState instance or None, default=0
    n_jobs : int or None, default=None
        Subset models trained in parallel through joblib (``None`` follows
        ``joblib.parallel_config``, so ``parallel_config(backend="dask")`` trains them on a Dask
        cluster); the models do not depend on it.
    verbose : int, default=0

    Attributes
    ----------
    masks_ : ndarray of shape (n_subsets, n_train) of bool
    models_ : list of TorchModel
    seeds_ : ndarray of shape (n_subsets,)
    n_train_ : int
    train_fingerprint_ : str
    cache_path_ : Path or None

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.trak import TRAK
    >>> from skattr.metrics import SubsetRetrainer
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0)
    >>> ret = SubsetRetrainer(model, n_subsets=8).fit(X[:200], y[:200])
    >>> trak = TRAK(model.fit(X[:200], y[:200]), projection_dim=128).fit(X[:200], y[:200])
    >>> lds = ret.score(trak, X[200:220], y[200:220])
    >>> -1 <= lds <= 1
    True
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "n_subsets": [Interval(numbers.Integral, 2, None, closed="left")],
        "fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "output": [str, numbers.Integral, callable],
        "reseed": ["boolean"],
        "cache_dir": [str, os.PathLike, None],
        "random_state": ["random_state"],
        "n_jobs": [numbers.Integral, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self, model, *, n_subsets=50, fraction=0.5, output="margin", reseed=True, cache_dir=None,
        random_state=0, n_jobs=None, verbose=0,
    ):
        self.model = model
        self.n_subsets = n_subsets
        self.fraction = fraction
        self.output = output
        self.reseed = reseed
        self.cache_dir = cache_dir
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    def _key(self):
        return config_key({
            "model": template_hash(self.model), "data": self.train_fingerprint_,
            "n_subsets": int(self.n_subsets), "fraction": float(self.fraction),
            "reseed": bool(self.reseed), "seed": self._seed,
        })

    def fit(self, X, y):
        """Draw the subsets and train (or load from ``cache_dir``) one model per subset."""
        self._validate_params()
        X = check_input(X)
        y = np.asarray(y)
        n = X.shape[0]
        if y.shape[0] != n:
            raise ValueError(f"X and y have inconsistent numbers of samples: {n} and {y.shape[0]}.")
        self._seed = seed_from_random_state(self.random_state)
        self.n_train_ = n
        self.train_fingerprint_ = data_hash(X, y)
        rng = np.random.default_rng(self._seed)
        size = max(1, int(round(float(self.fraction) * n)))
        self.masks_ = np.zeros((int(self.n_subsets), n), dtype=bool)
        for m in range(int(self.n_subsets)):
            self.masks_[m, rng.choice(n, size, replace=False)] = True
        self.seeds_ = rng.integers(0, 2**31 - 1, size=int(self.n_subsets))
        self.cache_path_ = None
        if self.cache_dir is not None:
            self.cache_path_ = Path(self.cache_dir) / f"lds-{self._key()}"
            self.cache_path_.mkdir(parents=True, exist_ok=True)
        M = int(self.n_subsets)
        paths = None
        if self.cache_path_ is not None:
            paths = [self.cache_path_ / f"model_{m:04d}.joblib" for m in range(M)]
        self.models_ = train_models(
            self.model, X, y, [np.flatnonzero(self.masks_[m]) for m in range(M)],
            [int(s) for s in self.seeds_] if self.reseed else [None] * M, paths=paths,
            n_jobs=self.n_jobs, verbose=self.verbose, desc="LDS: training subset models",
        )
        self._outputs = {}
        return self

    def outputs(self, X, y=None):
        """Output of every subset model on ``(X, y)``, (n_subsets, n_samples), cached."""
        check_is_fitted(self, "models_")
        X = check_input(X)
        key = config_key({"X": data_hash(X, y), "output": repr(make_output(self.output).describe())})
        if key in self._outputs:
            return self._outputs[key]
        path = None if self.cache_path_ is None else self.cache_path_ / f"outputs_{key}.joblib"
        if path is not None and path.exists():
            try:
                Y = joblib.load(path)
                self._outputs[key] = Y
                return Y
            except Exception:  # noqa: BLE001
                pass
        Y = np.stack([output_values(m, X, y, self.output) for m in self.models_])
        if path is not None:
            joblib.dump(Y, path)
        self._outputs[key] = Y
        return Y

    def score(self, attributions, X, y=None, *, return_per_sample=False):
        """LDS of ``attributions`` ((n_samples, n_train) array or fitted estimator) on ``(X, y)``."""
        return linear_datamodeling_score(
            attributions, X, y, retrainer=self, return_per_sample=return_per_sample
        )

    def search_split(self, X_train, y_train, X_test, y_test):
        """``(X_all, y_all, cv)`` for tuning an attribution estimator by LDS in ``GridSearchCV``.

        ``X_all`` stacks the training set the harness was fitted on and ``X_test``; ``cv`` is a
        single split whose training part is exactly that training set, so the search fits the
        estimator on it and :func:`make_lds_scorer` scores it on ``X_test``.
        """
        check_is_fitted(self, "models_")
        X_train, X_test = check_input(X_train), check_input(X_test)
        if data_hash(X_train, np.asarray(y_train)) != self.train_fingerprint_:
            raise ValueError("X_train, y_train are not the training set this SubsetRetrainer was fitted on.")
        X_all = np.concatenate([np.asarray(X_train), np.asarray(X_test)])
        y_all = np.concatenate([np.asarray(y_train), np.asarray(y_test)])
        n = self.n_train_
        return X_all, y_all, [(np.arange(n), np.arange(n, X_all.shape[0]))]


def linear_datamodeling_score(attributions, X, y=None, *, retrainer, return_per_sample=False):
    """The linear datamodeling score of attribution scores against retrained subset models.

    Parameters
    ----------
    attributions : array of shape (n_samples, n_train) or a fitted attribution estimator
        Scores ``tau(x_j, z_i)``, or an estimator with ``attribute(X, y)`` (``TRAK``,
        :class:`KernelAttribution` of a Grad-Cos kernel, ...) fitted on the retrainer's training
        set.
    X : array-like of shape (n_samples, ...)
        Test inputs.
    y : array-like of shape (n_samples,), default=None
        Test labels (targets of the output); None: each subset model's own prediction.
    retrainer : SubsetRetrainer
        Fitted on the same training set as the attributions.
    return_per_sample : bool, default=False

    Returns
    -------
    lds : float (and the per-sample correlations if ``return_per_sample``)

    Examples
    --------
    See :class:`SubsetRetrainer`.
    """
    if not isinstance(retrainer, SubsetRetrainer):
        raise TypeError(f"retrainer must be a SubsetRetrainer, got {type(retrainer).__name__}.")
    check_is_fitted(retrainer, "models_")
    if hasattr(attributions, "attribute"):
        est = attributions
        fp = getattr(est, "train_fingerprint_", None)
        if fp is not None and fp != retrainer.train_fingerprint_:
            raise ValueError(
                f"{type(est).__name__} was fitted on a different training set than the "
                "SubsetRetrainer; fit both on the same (X_train, y_train)."
            )
        attributions = est.attribute(X, y)
    A = np.asarray(attributions)
    n_test = X.shape[0]
    if A.ndim != 2 or A.shape[0] != n_test:
        raise ValueError(f"attributions must have shape (n_samples={n_test}, n_train), got {A.shape}.")
    if A.shape[1] != retrainer.n_train_:
        raise ValueError(
            f"attributions cover {A.shape[1]} training examples but the SubsetRetrainer was "
            f"fitted on {retrainer.n_train_}."
        )
    # an attribution predicts the output's change in its direction (-loss for the loss)
    Y = make_output(retrainer.output).direction * retrainer.outputs(X, y)
    return lds_from_outputs(A, retrainer.masks_, Y, return_per_sample=return_per_sample)


class _LDSScorer:
    def __init__(self, retrainer):
        self.retrainer = retrainer

    def __call__(self, estimator, X, y=None):
        return linear_datamodeling_score(estimator, X, y, retrainer=self.retrainer)

    def __repr__(self):
        return f"make_lds_scorer({self.retrainer!r})"


def make_lds_scorer(retrainer):
    """An sklearn scorer ``scorer(estimator, X, y) -> LDS`` for ``GridSearchCV``.

    The estimator is fitted by the search on its training fold, which must be the retrainer's
    training set: use ``X_all, y_all, cv = retrainer.search_split(X_train, y_train, X_test,
    y_test)`` and ``GridSearchCV(..., cv=cv).fit(X_all, y_all)``.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skattr import TorchModel
    >>> from skattr.estimators.trak import TRAK
    >>> from skattr.metrics import SubsetRetrainer, make_lds_scorer
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0)
    >>> ret = SubsetRetrainer(model, n_subsets=8).fit(X[:200], y[:200])
    >>> X_all, y_all, cv = ret.search_split(X[:200], y[:200], X[200:220], y[200:220])
    >>> search = GridSearchCV(TRAK(model.fit(X[:200], y[:200]), projection_dim=128),
    ...                       {"ridge": [1e-3, 1e-1]}, scoring=make_lds_scorer(ret), cv=cv)
    >>> search.fit(X_all, y_all).best_params_["ridge"] in (1e-3, 1e-1)
    True
    """
    if not isinstance(retrainer, SubsetRetrainer):
        raise TypeError(f"retrainer must be a SubsetRetrainer, got {type(retrainer).__name__}.")
    return _LDSScorer(retrainer)


class KernelAttribution(BaseEstimator):
    """Adapts a kernel transformer (e.g. ``GradCosKernel``) into an attribution estimator.

    ``fit(X, y)`` fits a clone of the kernel on the training set; ``attribute(X, y=None)`` returns
    ``K(X, X_train)`` (n_samples, n_train), so kernels can be scored by
    :func:`linear_datamodeling_score` next to TRAK.  ``y`` at ``attribute`` is accepted for API
    compatibility; the skattr kernels evaluate new samples at the network's predicted labels.

    Parameters
    ----------
    kernel : skattr kernel transformer

    Examples
    --------
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import GradCosKernel
    >>> from skattr.metrics import KernelAttribution
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(10, 4).numpy(), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    >>> KernelAttribution(GradCosKernel(TorchModel(net))).fit(X, y).attribute(X[:2]).shape
    (2, 10)
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __sklearn_clone__(self):
        return type(self)(clone(self.kernel))

    def fit(self, X, y=None):
        if not hasattr(self.kernel, "transform"):
            raise TypeError("kernel must be a kernel transformer with fit/transform.")
        X = check_input(X)
        self.kernel_ = clone(self.kernel).fit(X, y)
        self.n_train_ = int(X.shape[0])
        self.train_fingerprint_ = data_hash(X, None if y is None else np.asarray(y))
        return self

    def attribute(self, X, y=None):
        check_is_fitted(self, "kernel_")
        if y is not None and getattr(self.kernel_, "labels", None) == "given":
            # a kernel that evaluates its rows at given labels (GradCosKernel(labels="given"))
            return np.asarray(self.kernel_.transform(X, y), dtype=np.float64)
        return np.asarray(self.kernel_.transform(X), dtype=np.float64)

    def transform(self, X):
        return self.attribute(X)


def mislabel_detection_auc(scores, flipped_mask):
    """ROC AUC of ``scores`` (higher = more suspicious) at flagging flipped labels.

    Parameters
    ----------
    scores : array-like of shape (n_train,)
        E.g. ``TRAK.self_influence()`` or per-example losses.
    flipped_mask : array-like of shape (n_train,) of bool
        True where the label was flipped.

    Returns
    -------
    auc : float (0.5 = chance)

    Examples
    --------
    >>> from skattr.metrics import mislabel_detection_auc
    >>> mislabel_detection_auc([0.1, 0.9, 0.2, 0.8], [False, True, False, True])
    1.0
    """
    s, f = _check_detection_input(scores, flipped_mask, need_clean=True)
    return float(roc_auc_score(f, s))



def _check_detection_input(scores, flipped_mask, need_clean=False):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    f = np.asarray(flipped_mask).reshape(-1)
    if s.shape != f.shape:
        raise ValueError(f"scores and flipped_mask differ in length: {s.shape[0]} vs {f.shape[0]}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity.")
    f = f.astype(bool)
    if need_clean and (f.all() or not f.any()):
        raise ValueError("flipped_mask must contain both flipped and clean examples.")
    if not f.any():
        raise ValueError("flipped_mask marks no flipped example.")
    return s, f


def mislabel_detection_curve(scores, flipped_mask, fractions=None):
    """Precision and recall of inspecting the most suspicious examples first.

    The examples are inspected in decreasing order of ``scores`` (ties in their index order);
    after inspecting a fraction ``q`` of the training set (``ceil(q n)`` examples), *recall* is
    the fraction of all flipped labels found and *precision* the fraction of the inspected
    examples that are flipped.

    Parameters
    ----------
    scores : array-like of shape (n_train,)
        Higher = more suspicious (self-influence, per-example loss, ...).
    flipped_mask : array-like of shape (n_train,) of bool
    fractions : array-like of float in (0, 1], default=None
        Fractions inspected; ``None``: every count ``1 .. n_train``.

    Returns
    -------
    fractions : ndarray
        The fractions inspected (``count / n_train``).
    recall : ndarray
        Fraction of the flipped labels found.
    precision : ndarray
        Fraction of the inspected examples that are flipped.

    Examples
    --------
    >>> from skattr.metrics import mislabel_detection_curve
    >>> q, rec, prec = mislabel_detection_curve([0.9, 0.1, 0.8, 0.2], [True, False, False, True], [0.25, 0.5, 1.0])
    >>> rec.tolist(), prec.tolist()
    ([0.5, 0.5, 1.0], [1.0, 0.5, 0.5])
    """
    s, f = _check_detection_input(scores, flipped_mask)
    n = s.shape[0]
    order = np.argsort(-s, kind="stable")
    found = np.cumsum(f[order])
    if fractions is None:
        counts = np.arange(1, n + 1)
    else:
        q = np.asarray(fractions, dtype=np.float64).reshape(-1)
        if np.any(~np.isfinite(q)) or np.any(q <= 0) or np.any(q > 1):
            raise ValueError(f"fractions must lie in (0, 1], got {q.tolist()[:5]}.")
        counts = np.maximum(1, np.ceil(q * n - 1e-9).astype(np.int64))
    hits = found[counts - 1]
    return counts / n, hits / f.sum(), hits / counts


def precision_at_fraction(scores, flipped_mask, fraction=0.1):
    """Fraction of flipped labels among the ``ceil(fraction n)`` most suspicious examples
    (see :func:`mislabel_detection_curve`).

    Examples
    --------
    >>> from skattr.metrics import precision_at_fraction
    >>> precision_at_fraction([0.9, 0.1, 0.8, 0.2], [True, False, False, True], 0.5)
    0.5
    """
    return float(mislabel_detection_curve(scores, flipped_mask, [fraction])[2][0])


def recall_at_fraction(scores, flipped_mask, fraction=0.1):
    """Fraction of all flipped labels found among the ``ceil(fraction n)`` most suspicious
    examples (see :func:`mislabel_detection_curve`).

    Examples
    --------
    >>> from skattr.metrics import recall_at_fraction
    >>> recall_at_fraction([0.9, 0.1, 0.8, 0.2], [True, False, False, True], 0.5)
    0.5
    """
    return float(mislabel_detection_curve(scores, flipped_mask, [fraction])[1][0])


__all__ += ["mislabel_detection_curve", "precision_at_fraction", "recall_at_fraction"]


def retrain_without_suspects(model, X, y, scores, k, *, X_test, y_test, n_seeds=1, random_state=0,
                             n_jobs=None, verbose=0):
    """Test score and loss of the network retrained without its top-``k`` suspects vs ``k``
    random examples.

    For every count ``k`` and training seed: drop the ``k`` training examples with the highest
    ``scores`` (ties in index order, as :func:`mislabel_detection_curve` inspects them), and as
    a control ``k`` random examples, retrain a clone of ``model`` on the rest and evaluate it on
    the test set.  A baseline retrains on the whole set.  Every condition with seed ``j`` trains
    with the same ``random_state`` (initialisation and batch order), so the conditions differ
    only in the examples removed.  Retraining runs through the shared harness
    (:func:`skattr.ensemble.train_models`).

    Parameters
    ----------
    model : TorchModel
        Template: its training settings are reused, its fitted weights ignored.
    X, y : training set the scores refer to.
    scores : array-like of shape (n_train,)
        Higher = more suspicious (self-influence, per-example loss, a mislabel score).
    k : int or sequence of int
        Numbers of examples removed, each in ``[1, n_train - 1]``.
    X_test, y_test : held-out set the retrained networks are evaluated on.
    n_seeds : int, default=1
        Training seeds per condition (the same seeds for every condition).
    random_state : int, RandomState instance or None, default=0
        Sets the training seeds (``seed + j``) and the random controls.
    n_jobs : int or None, default=None
        Models retrained in parallel; the result does not depend on it.
    verbose : int, default=0

    Returns
    -------
    result : dict
        ``"k"`` (n_k,); ``"seeds"`` (n_seeds,) training seeds; ``"removed"``: the top-``k``
        indices for each ``k``; ``"removed_random"``: the random controls' indices for each
        ``k``, (n_seeds, k) (nested: the first ``k`` of one permutation per seed);
        ``"score_all"`` / ``"loss_all"`` (n_seeds,): the network
        retrained on the whole set; ``"score_suspects"``, ``"loss_suspects"``,
        ``"score_random"``, ``"loss_random"`` (n_k, n_seeds); ``"score_change_suspects"``,
        ``"score_change_random"``, ``"loss_change_suspects"``, ``"loss_change_random"``
        (n_k,): the mean over seeds of the change against the whole set.  The score is
        ``model.score`` (accuracy, or R^2 for regression); the loss is the mean per-example
        training loss (``TorchModel.per_example_loss``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skattr import TorchModel
    >>> from skattr.metrics import retrain_without_suspects
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 2)).astype("float32")
    >>> y = (X[:, 0] > 0).astype(int)
    >>> y[:6] = 1 - y[:6]                       # six flipped labels
    >>> model = TorchModel(torch.nn.Linear(2, 2), epochs=5, batch_size=20, random_state=0)
    >>> suspects = np.r_[np.ones(6), np.zeros(54)]   # a perfect detector
    >>> res = retrain_without_suspects(model, X, y, suspects, [6], X_test=X, y_test=(X[:, 0] > 0))
    >>> res["score_suspects"].shape, res["removed"][0].tolist()
    ((1, 1), [0, 1, 2, 3, 4, 5])
    """
    if not isinstance(model, TorchModel):
        raise TypeError(f"model must be a TorchModel, got {type(model).__name__}.")
    X = check_input(X)
    n = X.shape[0]
    y = np.asarray(y)
    if y.shape[0] != n:
        raise ValueError(f"X and y have inconsistent numbers of samples: {n} and {y.shape[0]}.")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"scores has {s.shape[0]} entries but X has {n} training examples.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity.")
    ks = np.atleast_1d(np.asarray(k))
    if ks.ndim != 1 or ks.size == 0 or not all(isinstance(v, numbers.Integral) for v in ks.tolist()):
        raise ValueError(f"k must be an integer or a non-empty sequence of integers, got {k!r}.")
    ks = ks.astype(np.int64)
    if np.any(ks < 1) or np.any(ks > n - 1):
        raise ValueError(f"k must lie in [1, n_train - 1] = [1, {n - 1}], got {ks.tolist()}.")
    if not isinstance(n_seeds, numbers.Integral) or n_seeds < 1:
        raise ValueError(f"n_seeds must be a positive integer, got {n_seeds!r}.")
    X_test = check_input(X_test)
    y_test = np.asarray(y_test)
    if y_test.shape[0] != X_test.shape[0]:
        raise ValueError(f"X_test and y_test have inconsistent numbers of samples: "
                         f"{X_test.shape[0]} and {y_test.shape[0]}.")
    base = seed_from_random_state(random_state)
    seeds = [(base + j) % (2**31) for j in range(int(n_seeds))]
    order = np.argsort(-s, kind="stable")
    removed = [np.sort(order[:kk]) for kk in ks]
    perms = [np.random.default_rng(np.random.SeedSequence(base, spawn_key=(j,))).permutation(n)
             for j in range(len(seeds))]
    subsets, train_seeds = [], []
    for perm, seed in zip(perms, seeds):
        subsets.append(np.arange(n))
        for kk in ks:
            subsets.append(np.sort(order[kk:]))
            subsets.append(np.sort(perm[kk:]))
        train_seeds += [seed] * (1 + 2 * ks.size)
    models = train_models(model, X, y, subsets, train_seeds, n_jobs=n_jobs, verbose=verbose,
                          desc="retraining without suspects")

    def evaluate(m):
        return float(m.score(X_test, y_test)), float(np.mean(m.per_example_loss(X_test, y_test)))

    per = np.array([evaluate(m) for m in models]).reshape(len(seeds), 1 + 2 * ks.size, 2)
    res = {"k": ks, "seeds": np.asarray(seeds), "removed": removed,
           "removed_random": [np.sort(np.stack([p[:kk] for p in perms]), 1) for kk in ks]}
    for c, what in enumerate(("score", "loss")):
        whole = per[:, 0, c]
        sus = per[:, 1::2, c].T
        rnd = per[:, 2::2, c].T
        res[f"{what}_all"], res[f"{what}_suspects"], res[f"{what}_random"] = whole, sus, rnd
        res[f"{what}_change_suspects"] = (sus - whole).mean(1)
        res[f"{what}_change_random"] = (rnd - whole).mean(1)
    return res


__all__ += ["retrain_without_suspects"]
