"""TRAK (Park et al., 2023): attribution by random projections of an ensemble's output gradients.

For each model ``m`` of an ensemble, every training example ``z_i`` gets the feature
``phi_i = P grad_theta f(z_i; theta_m) / sqrt(k)`` of a *model-output function* ``f`` (for
classification the margin ``log(p / (1 - p))`` of the correct class), and the score of training
example ``i`` for a target ``x`` is

    tau_m(x, z_i) = phi(x)^T (Phi^T Phi + lambda I)^{-1} phi_i,

``Phi`` the stacked training features.  The ensemble's score is the average over models times the
averaged reweighting term ``Q_i = 1 - p_i`` (``p_i`` the probability of the correct class, i.e.
``Q = -d loss / d f``), as in Algorithm 1 of the TRAK paper:

    tau(x, z_i) = mean_m tau_m(x, z_i) * mean_m Q_{m, i}.

Implementation notes
--------------------
* Features come from :mod:`skattr.gradients` (structured engine: no per-example gradient is formed
  for Linear / Conv layers) and :mod:`skattr.projection` (seeded, nested; ``"factored"`` projects
  the (layer input, output gradient) pair directly).  ``projection_dim=None`` uses the exact
  per-example gradients.
* The linear solve uses the smaller of ``Phi^T Phi`` (``k x k``, "primal") and ``Phi Phi^T``
  (``n x n``, "dual"); both give the same scores (push-through identity), and the dual form is
  the minimum-norm solution when ``ridge=0`` and ``k > n``.
* ``ridge`` is relative: ``lambda = ridge * mean_i |phi_i|^2``, so it does not depend on the
  scale of the gradients or on ``projection_dim``.
* Precision follows the features: products of float32 features run in float32 and are summed
  across store blocks in float64; the system is factorised in float32 too when it is well
  conditioned (``1 + n / ridge <= 1e5``; its entries are only float32-accurate; a breakdown is
  redone in float64); scores come from triangular solves with the factor.  ``ridge=0`` or
  float64 features: float64 throughout.
* The scores are :class:`skattr.estimators.base.BaseAttributor`'s, with the preconditioner
  :class:`skattr.preconditioners.RidgeGaussNewton`, weights ``1 / n_models`` and ``Q``.
* With ``store=`` the features live in an on-disk :class:`skattr.store.FeatureStore` and every
  computation is blockwise; an interrupted featurisation resumes where it stopped.
"""

from __future__ import annotations

import copy
import numbers
from pathlib import Path

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from .._fingerprint import config_key, template_hash
from ..ensemble import load_member, subset_indices, train_models
from ..exceptions import SingleModelWarning, UntrainedModelWarning
from ..outputs import (  # noqa: F401 - re-exported: they were defined here before skattr.outputs
    CallableOutput,
    LogitOutput,
    MarginOutput,
    ModelOutput,
    make_output,
    output_values,
)
from ..preconditioners import RidgeGaussNewton
from ..store import MemoryStore
from .base import BaseAttributor

__all__ = ["TRAK"]


class TRAK(BaseAttributor):
    """TRAK training-data attribution for a PyTorch network (Park et al., 2023).

    ``fit(X_train, y_train)`` featurises the training set with every model of the ensemble;
    ``attribute(X, y)`` returns the scores ``tau(x, z_i)`` of shape ``(n_samples, n_train)``
    (positive: training example ``i`` raises the output ``f`` on ``x``); ``transform(X)``
    attributes the ensemble's own predictions; ``self_influence()`` scores each training example
    against itself (a mislabel detector).

    Parameters
    ----------
    model : TorchModel
        The network.  With ``models=None`` and ``n_models`` None or 1 it is the single model
        attributed (trained, or a wrapped pretrained module); with ``n_models > 1`` it is the
        template whose clones are trained on random subsets (TRAK-k).
    projection_dim : int or None, default=2048
        Dimension ``k`` of the random projection; ``None`` uses the exact per-example gradients.
    projection : {"kronecker", "factored", "rademacher", "gaussian", "sparse"}, default="kronecker"
        Kind of projection (:mod:`skattr.projection`).  ``"kronecker"`` and ``"factored"`` never
        form a per-example gradient of a Linear layer (a Conv layer with a small kernel is
        projected from its formed gradient when that is cheaper); ``"kronecker"`` rows cost a
        quarter of ``"factored"`` ones, and on digits its LDS is within 0.001-0.003 of
        factored's with 10 models (0.01 for one model at k = 512; benchmarks/README.md,
        section 4), so it is TRAK's default (the kernel estimators keep ``"factored"``, whose
        rows are independent).
    n_models : int or None, default=None
        Ensemble size.  With ``models`` given, the first ``n_models`` of them (default all);
        otherwise ``None`` or 1 attributes ``model`` itself and ``n_models > 1`` trains that many
        clones of ``model`` (``sklearn.base.clone(model).fit``) on random subsets of the training
        data.  Member ``j`` depends only on ``random_state`` and ``j``, so the first five models
        of a 10-model ensemble are the 5-model ensemble.  One model that fits its training set
        raises a :class:`~skattr.SingleModelWarning` (see Warns).
    models : list, default=None
        A given ensemble: fitted :class:`~skattr.TorchModel` objects, state dicts of
        ``model``'s network, ``(step, state_dict)`` checkpoints as recorded by
        :class:`~skattr.TrajectoryRecorder`, or paths to files saved with ``torch.save``.
        They must share ``model``'s architecture.
    subset_fraction : float in (0, 1], default=0.5
        Fraction of the training set each trained member sees (1.0: the full set, members
        differ only by their seeds).
    output : "margin", "logit", class label, callable or ModelOutput, default="margin"
        The model-output function: the classification margin (with ``Q = 1 - p``), the logit of
        the label (or of a fixed class), any callable ``fn(logits, y) -> (n,)`` (``Q = 1`` unless
        ``fn.q`` exists), or a :class:`ModelOutput` such as a concept probe's
        (:meth:`skattr.estimators.concept.ConceptProbe.output_function`).
    ridge : float >= 0, default=1.0
        Relative ridge: ``lambda = ridge * mean_i |phi_i|^2`` (1.0: the squared norm of a typical
        training feature), so it does not depend on the scale of the gradients or on
        ``projection_dim``; 1.0 gave the best LDS on digits (benchmarks/README.md, section 4).
        0 inverts ``Phi^T Phi`` (or ``Phi Phi^T`` when ``k > n``) exactly and raises if it is
        singular.
    store : str, path-like or None, default=None
        Directory of an on-disk feature store (:class:`skattr.store.FeatureStore`), for training
        sets whose features do not fit in memory.  Features are written block by block under
        ``store/<hash of the settings>``; trained ensemble members are cached there too.  A fit
        interrupted midway resumes where it stopped.
    block_size : int, default=4096
        Training examples per store block and per scoring block.
    method : {"auto", "structured", "vmap"}, default="auto"
        Gradient engine (:func:`skattr.gradients.compute_records`).
    batch_size : int, default=None
        Examples per gradient batch (default: the model's ``batch_size_eval``).
    random_state : int, RandomState instance or None, default=0
        Seeds the projection, the subsets and the members' training.
    n_jobs : int or None, default=None
        joblib workers for the independent work: training ensemble members
        (:func:`skattr.ensemble.train_models`), featurising blocks of ``block_size`` training
        examples (each worker gets its shard and, with ``store``, writes its blocks into the
        store itself), the store's ``Phi^T Phi`` block by block, and scoring blocks
        (``attribute(X, out=...)``, ``top_k``).  ``None`` takes the active
        ``joblib.parallel_config`` (one worker by default; under
        ``parallel_config(backend="dask")`` the Dask cluster's).  The results do not depend on
        it (:mod:`skattr.parallel`).
    verbose : int, default=0
        Progress bars when > 0.

    Attributes
    ----------
    models_ : list of TorchModel
        The ensemble.
    subsets_ : ndarray of shape (n_models, n_train) of bool, or None
        Training examples seen by each trained member (None for given models).
    engine_ : dict
        The gradient engine that ran (``"engine"``: structured, vmap or autograd) and why
        (``"reason"``); printed when ``verbose``.
    preconditioners_ : list of RidgeGaussNewton
        Each member's fitted solver (:mod:`skattr.preconditioners`).
    weights_ : ndarray of shape (n_models,)
        ``1 / n_models``.
    q_ : ndarray of shape (n_train,)
        The averaged reweighting term ``mean_m Q_{m,i}``.
    lambdas_ : ndarray of shape (n_models,)
        The absolute ridge of each member.
    cholesky_ : list of ndarray of shape (k, k) (primal) or (n_train, n_train) (dual)
        The lower Cholesky factor of each member's ``Phi^T Phi + lambda I`` (or ``Phi Phi^T +
        lambda I``): float32 for float32 features when ``1 + n_train / ridge <= 1e5`` (a bound
        on its condition number), float64 otherwise.
    solver_ : {"primal", "dual"}
        ``k x k`` system (k <= n) or ``n x n`` system (k > n).
    feature_dim_ : int
        ``projection_dim``, or the number of parameters for exact TRAK.
    store_ : FeatureStore or None
    n_train_, n_features_in_, input_shape_, train_fingerprint_

    Warns
    -----
    UntrainedModelWarning
        In ``fit``, when the one model attributed (as for ``SingleModelWarning``) has a median
        ``p(true class)`` over the training set below 1.25 / (number of classes): most often a
        ``TorchModel`` never fitted, which ``n_models=None`` attributes as it is.
    SingleModelWarning
        In ``fit``, once, when TRAK attributes one model (``n_models`` None or 1, or one given
        model) with a ``1 - p`` reweighting (``output="margin"`` or ``"logit"`` of a classifier)
        and that model fits its training set: the median of ``1 - p(true class)`` over the
        training set is below 0.01, i.e. more than half of the training examples are fitted
        with ``p > 0.99``.  Their scores are then scaled by less than 1/100, so the ranking
        follows the few unfitted examples more than the similarity to the target.  The message
        gives the measured median and share and what to do: ``n_models >= 4``, or a method
        built for one model (:class:`~skattr.estimators.TracIn` over its checkpoints,
        :class:`~skattr.estimators.influence.InfluenceFunction`,
        :class:`~skattr.estimators.HYDRA`).  Measured on digits in the documentation's TRAK
        page (``trak.html``), section "How many models".

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.trak import TRAK
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0).fit(X[:300], y[:300])
    >>> trak = TRAK(model, projection_dim=256).fit(X[:300], y[:300])
    >>> trak.attribute(X[300:305], y[300:305]).shape
    (5, 300)
    >>> trak.self_influence().shape
    (300,)
    """

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "n_models": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "models": [list, tuple, None],
        "subset_fraction": [Interval(numbers.Real, 0, 1, closed="right")],
        "output": [StrOptions({"margin", "logit", "loss"}), numbers.Integral, callable],
        "ridge": [Interval(numbers.Real, 0, None, closed="left")],
        "n_jobs": [numbers.Integral, None],
    }
    _models_param = ("models",)

    def __init__(
        self,
        model,
        *,
        projection_dim=2048,
        projection="kronecker",
        n_models=None,
        models=None,
        subset_fraction=0.5,
        output="margin",
        ridge=1.0,
        store=None,
        block_size=4096,
        method="auto",
        batch_size=None,
        random_state=0,
        n_jobs=None,
        verbose=0,
    ):
        self.model = model
        self.projection_dim = projection_dim
        self.projection = projection
        self.n_models = n_models
        self.models = models
        self.subset_fraction = subset_fraction
        self.output = output
        self.ridge = ridge
        self.store = store
        self.block_size = block_size
        self.method = method
        self.batch_size = batch_size
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ the ensemble
    def _fit_models(self, X, y):
        if self.models is not None:
            if len(self.models) == 0:
                raise ValueError("models is an empty list; pass at least one model or None.")
            M = len(self.models) if self.n_models is None else int(self.n_models)
            if M > len(self.models):
                raise ValueError(f"n_models={M} but only {len(self.models)} models were given.")
            return [load_member(self.model, o, f"models[{i}]") for i, o in enumerate(self.models[:M])], None
        M = 1 if self.n_models is None else int(self.n_models)
        if M == 1:
            return [copy.deepcopy(self.model)], None
        if y is None:
            raise ValueError(f"n_models={M} trains an ensemble on (X, y): y is required to fit TRAK-{M}.")
        n = X.shape[0]
        subsets, seeds = zip(*(subset_indices(self._seed, j, n, self.subset_fraction) for j in range(M)))
        masks = np.zeros((M, n), dtype=bool)
        for j, idx in enumerate(subsets):
            masks[j, idx] = True
        paths = None
        if self.store is not None:
            base = {"model": template_hash(self.model), "data": self.train_fingerprint_,
                    "fraction": float(self.subset_fraction), "seed": self._seed}
            cache = Path(self.store) / "members"
            paths = [cache / f"member-{config_key({**base, 'j': j})}.joblib" for j in range(M)]
        members = train_models(self.model, X, np.asarray(y), list(subsets), list(seeds), paths=paths,
                               n_jobs=self.n_jobs, verbose=self.verbose, desc="TRAK: training ensemble")
        return members, masks

    def _make_preconditioner(self, j):
        return RidgeGaussNewton(self.ridge, self._device, persist=self.store is not None, n_jobs=self.n_jobs)

    # median of 1 - p(true class) over the training set below which one model "fits its training
    # set" (more than half of the examples at p > 0.99): see the Warns section
    _FITTED_MEDIAN_Q = 0.01

    def _after_fit(self, X, y, y_enc):
        if len(self.models_) != 1 or self.models_[0].task != "classification":
            return
        out = self.output_
        if not (type(out) is MarginOutput or (type(out) is LogitOutput and out.cls is None)):
            return  # no 1 - p reweighting (a probe, a fixed class, a callable)
        q = np.asarray(self.q_, dtype=np.float64)
        median, thr = float(np.median(q)), self._FITTED_MEDIAN_Q
        C = len(self.models_[0].class_labels())
        if 1.0 - median < 1.25 / C:
            self._warn(UntrainedModelWarning(
                f"TRAK attributes one model that predicts its training set no better than chance: "
                f"the median p(true class) over the {q.size} training examples is "
                f"{1.0 - median:.3f} (chance 1/{C} = {1 / C:.3f}). Was the TorchModel fitted? "
                "With n_models=None TRAK attributes the model as it is: call model.fit(X, y) "
                "first, or pass n_models to train an ensemble of its clones."
            ), stacklevel=3)
            return
        if not median < thr:
            return
        self._warn(SingleModelWarning(
            f"TRAK attributes one model, and it fits its training set: 1 - p(true class) is below "
            f"{thr:g} for {np.mean(q < thr):.0%} of the {q.size} training examples (median "
            f"{median:.1e}), so TRAK's 1 - p weights scale most scores by less than 1/100 and the "
            "top proponents follow the few unfitted examples rather than the target.  Use an "
            "ensemble, n_models>=4 (clones trained on random subsets; or models=[...] of "
            "independently trained networks), or a method built for one model: TracIn over its "
            "checkpoints, InfluenceFunction, HYDRA (skattr documentation, page trak.html, "
            "section 'How many models': trak.html#how-many-models)."
        ), stacklevel=3)

    def _reweighting(self):
        return self.q_models_.mean(0)

    # ------------------------------------------------------------------ fitted state
    @property
    def cholesky_(self):
        """Each member's lower Cholesky factor of ``Phi^T Phi + lambda I`` (primal) or
        ``Phi Phi^T + lambda I`` (dual)."""
        return [p.cholesky_ for p in self.preconditioners_]

    @property
    def lambdas_(self):
        """The absolute ridge of each member."""
        return np.asarray([p.lambda_ for p in self.preconditioners_])

    @property
    def solver_(self):
        """``"primal"`` (k x k system, k <= n) or ``"dual"`` (n x n, k > n)."""
        return self.preconditioners_[0].solver_

    def __setstate__(self, state):
        # pickles from before the preconditioners held the factors
        if "factors_" in state and "cholesky_" not in state:
            state["cholesky_"] = state.pop("factors_")
        if "cholesky_" in state and "preconditioners_" not in state:
            dev = state["models_"][0].device_
            ridge = state.get("ridge", 1.0)
            n, k = state["n_train_"], state["feature_dim_"]
            state["preconditioners_"] = [
                RidgeGaussNewton.from_factor(L, lam, state.pop("solver_", None) or ("primal" if k <= n else "dual"),
                                             ridge, n, k, dev)
                for L, lam in zip(state.pop("cholesky_"), state.pop("lambdas_"))
            ]
            state.setdefault("weights_", np.full(len(state["models_"]), 1.0 / len(state["models_"])))
        super().__setstate__(state)


_MemoryStore = MemoryStore  # old pickles name the in-memory store by its former place
