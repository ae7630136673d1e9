"""BaseAttributor: what every training-data attribution method shares.

An attributor scores training examples ``z_i`` for a target ``x`` as a weighted sum over its
models ``m`` (TRAK's ensemble members, TracIn's checkpoints, the one model of influence
functions) of preconditioned inner products of features:

    tau(x, z_i) = Q_i * sum_m w_m  phi_m(x)^T M_m phi_m(z_i),

``phi_m`` the (projected) gradient of a model-output function (:mod:`skattr.outputs`) computed
by the one featuriser (:mod:`skattr.featurize`) into a store (:mod:`skattr.store`), ``M_m`` a
preconditioner (:mod:`skattr.preconditioners`), ``w_m`` the models' weights and ``Q_i`` a
per-example reweighting (TRAK's ``1 - p``; 1 elsewhere).  Positive scores mean the training
example helped: it raised the output (margin, logit) or lowered the loss at ``x``.

Subclasses say which models they attribute (:meth:`_fit_models`), their weights and their
preconditioners; fitting, storing, scoring, self-influence, top-k and the attributor's kernel
live here once.
"""

from __future__ import annotations

import copy
import numbers
import os
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._fingerprint import data_hash
from .._validation import check_fitted_shape, check_input, check_memory, seed_from_random_state
from ..ensemble import check_members
from ..featurize import Featurizer, encode_targets, progress, projection_seed
from ..model import TorchModel
from ..outputs import make_output
from ..parallel import featurize_blocks, score_blocks
from ..preconditioners import Identity, as_tensor
from ..projection import KINDS
from ..store import FeatureStore, MemoryStore, TopK  # noqa: F401 - TopK re-exported

__all__ = ["AttributionKernel", "BaseAttributor", "TopK"]


class BaseAttributor(TransformerMixin, BaseEstimator):
    """Base class of the attribution estimators (not used directly).

    ``fit(X_train, y_train)`` featurises the training set under every model of the method;
    ``attribute(X, y)`` returns ``(n_samples, n_train)`` scores (positive: the training
    example helped); ``transform(X)`` attributes the network's own predictions;
    ``self_influence()`` scores each training example against itself; ``top_k(X, y, k)`` gives
    the strongest proponents and opponents; ``kernel(X, Y)`` is the symmetric kernel the
    attribution defines (see :meth:`kernel`).
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions(set(KINDS))],
        "store": [str, os.PathLike, None],
        "block_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "method": [StrOptions({"auto", "structured", "vmap", "autograd"})],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    # ------------------------------------------------------------------ subclass hooks
    _output_param = "output"  # name of the parameter holding the output function
    _models_param = ()  # parameters holding networks / checkpoints: deep-copied by clone
    _fit_needs_y = False

    def _get_output(self):
        return getattr(self, self._output_param, "loss")

    def _fit_models(self, X, y):
        """The fitted TorchModels attributed, and optional per-model training subsets."""
        return [copy.deepcopy(self.model)], None

    def _model_weights(self):
        """``w_m`` per model (default: the mean over models)."""
        M = len(self.models_)
        return np.full(M, 1.0 / M)

    def _make_preconditioner(self, j):
        return Identity(self._device)

    def _store_config(self):
        """Extra keys of the on-disk store's configuration."""
        return {}

    def _after_fit(self, X, y, y_enc):
        """Hook run after the preconditioners are fitted."""

    # ------------------------------------------------------------------ sklearn
    def __sklearn_clone__(self):
        # The network (and given models) are what is attributed, not sub-estimators to refit:
        # sklearn's clone would drop their trained weights, so they are deep-copied.
        params = self.get_params(deep=False)
        new = {}
        for k, v in params.items():
            if k == "model" or k in self._models_param:
                new[k] = copy.deepcopy(v)
            else:
                new[k] = clone(v, safe=False)
        out = type(self)(**new)
        # what this attributor's fit warned (and what its own original's did): a clone refitted
        # on the same data (AttributionKernel and KernelSurrogate refit the attributor they are
        # given) does not repeat those warnings, see _warn
        out._warned_before = self._warned_before | getattr(self, "_warned", frozenset())
        return out

    _warned_before = frozenset()

    def _warn(self, warning, stacklevel):
        """``warnings.warn(warning)`` from a fit, unless the attributor this one was cloned from
        gave the same warning when fitted on the same data (the user saw it then).
        ``stacklevel`` counts from the caller of ``_warn``."""
        key = (self.train_fingerprint_, type(warning).__name__, str(warning))
        self._warned = getattr(self, "_warned", frozenset()) | {key}
        if key not in self._warned_before:
            warnings.warn(warning, stacklevel=stacklevel + 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self):
        return self.models_[0].device_

    def _name(self):
        return type(self).__name__

    def _featurizer(self, j):
        m = self.models_[j]
        return Featurizer(
            m, self.output_, projection_dim=self.projection_dim, projection=self.projection,
            seed=projection_seed(self._seed, j), method=self.method, batch_size=self.batch_size,
        )

    def _prediction_models(self):
        """The models whose (averaged) predictions label unlabelled samples."""
        return self.models_

    def _labels(self, models, X, y):
        """Encoded targets per model for (X, y); y=None: the predictions of
        :meth:`_prediction_models` (TRAK: the ensemble's; TracIn: the trained network's)."""
        if y is not None or not hasattr(self, "models_"):
            return encode_targets(models, self.output_, X, y, self.batch_size)
        yt = encode_targets(self._prediction_models(), self.output_, X, None, self.batch_size)[0]
        return [yt.to(m.device_) for m in models]

    def _check_fit_input(self, X, y):
        if not isinstance(self.model, TorchModel):
            raise TypeError(
                f"model must be a skattr.TorchModel, got {type(self.model).__name__}; wrap your "
                "network as TorchModel(module)."
            )
        X = check_input(X)
        n = int(X.shape[0])
        if y is not None:
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
            if y.shape[0] != n:
                raise ValueError(f"X and y have inconsistent numbers of samples: {n} and {y.shape[0]}.")
        elif self._fit_needs_y:
            raise ValueError(f"{self._name()} needs the training labels: call fit(X, y).")
        return X, y

    def _check_X(self, X):
        check_is_fitted(self, "preconditioners_")
        X = check_input(X)
        if X.ndim == 2 and len(self.input_shape_) == 1 and X.shape[1] != self.input_shape_[0]:
            raise ValueError(
                f"X has {X.shape[1]} features, but {self._name()} is expecting "
                f"{self.input_shape_[0]} features as input (the training set's)."
            )
        check_fitted_shape(X, self.input_shape_)
        return X

    def _check_y(self, y):
        if y is not None:
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return y

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Featurise the training set ``(X, y)`` under every model of the method.

        Parameters
        ----------
        X : array-like or tensor of shape (n_train, ...)
        y : array-like of shape (n_train,), default=None
            Training labels (targets of the output function); default the model's
            predictions where the method allows it.

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = self._check_fit_input(X, y)
        n = int(X.shape[0])
        self._seed = seed_from_random_state(self.random_state)
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        self.n_train_ = n
        self.train_fingerprint_ = data_hash(X, y)
        self._warned = frozenset()  # the warnings of this fit (_warn)
        self.output_ = make_output(self._get_output())

        models, masks = self._fit_models(X, y)
        for m in models:
            m.prepare(X[:1])
        check_members(models, X, template=self.model, **self._member_names())
        self.output_.check(models[0])
        if len(models) > 1 and getattr(self.output_, "single_model", False):
            raise ValueError(
                f"{type(self.output_).__name__} is tied to the network it was built on; use a "
                "single model with it."
            )
        self.models_, self.subsets_ = models, masks
        y_enc = self._labels(models, X, y)
        self._fit_features(X, y_enc)
        self._after_fit(X, y, y_enc)
        return self

    def _member_names(self):
        return {}

    def _fit_features(self, X, y_enc):
        models, n = self.models_, self.n_train_
        dtype = np.dtype(models[0].dtype)
        self.feature_dim_ = self._featurizer(0).dim(X, y_enc[0])
        k, M = self.feature_dim_, len(models)
        bsz = int(self.block_size)
        name = self._name()
        if self.store is None:
            check_memory(
                M * n * k * dtype.itemsize,
                f"{name} features for {M} model(s) x {n} examples x {k} dimensions",
                hint="Use store='some/dir' for an on-disk feature store, or a smaller projection_dim.",
            )
            store = MemoryStore(n, k, M, bsz, dtype)
        else:
            config = {
                "members": [m.fingerprint() for m in models],
                "output": self.output_.describe(),
                "projection": self.projection if self.projection_dim is not None else "exact",
                "k": k, "seed": self._seed, "member_seeds": "independent", "method": self.method,
                "data": self.train_fingerprint_, **self._store_config(),
            }
            store = FeatureStore.for_config(
                self.store, config, n_rows=n, dim=k, n_models=M, block_size=bsz, dtype=dtype.name,
            )
        todo = store.missing()
        self._report_engine(self._featurizer(0), X, y_enc[0])
        # blocks through joblib (n_jobs, parallel_config): in this process with one worker
        featurize_blocks(self._featurizer, X, y_enc, store, todo, dim=k,
                         n_jobs=getattr(self, "n_jobs", None), verbose=self.verbose,
                         desc=f"{name}: featurising {len(todo)} block(s)")
        self.store_ = store if self.store is not None else None
        self._features = store
        self.preconditioners_ = [self._make_preconditioner(j).fit(store, j) for j in range(M)]
        self.q_models_ = np.stack([np.asarray(store.q(m), dtype=np.float64) for m in range(M)])
        self.q_ = self._reweighting()
        self.weights_ = np.asarray(self._model_weights(), dtype=np.float64)

    def _report_engine(self, fz, X, y_enc):
        """Set ``engine_`` (which gradient engine runs and why) from one example's records,
        and say it when verbose."""
        fz.records(self.models_[0].to_tensor(X[:1]), None if y_enc is None else y_enc[:1])
        self.engine_ = {k: fz.info.get(k) for k in ("engine", "reason")}
        if self.verbose:
            print(f"[skattr] {self._name()}: gradient engine {self.engine_['engine']!r} "
                  f"({self.engine_['reason']})", flush=True)

    def _reweighting(self):
        """``Q_i``: 1 unless the method reweights (TRAK)."""
        return np.ones(self.n_train_)

    # ------------------------------------------------------------------ scoring
    def _raw_rows(self, j, X, y_enc):
        """Features of ``X`` under model ``j`` (t, k), as the training rows were computed."""
        G, _ = self._featurizer(j).rows(X, y_enc, 0, X.shape[0], dim=self.feature_dim_)
        return G

    def _target_rows(self, j, X, y_enc):
        """Target rows of model ``j`` handed to its preconditioner's ``scores`` (default: the
        raw features; a method preconditioning in parameter space returns them already
        preconditioned and pairs them with :class:`~skattr.preconditioners.Identity`)."""
        return self._raw_rows(j, X, y_enc)

    def _preconditioned_rows(self, j, X, y_enc, raw=None):
        """``phi_j(X) M_j`` as a float64 tensor (t, k) (``raw``: ``phi_j(X)`` if known)."""
        G = raw if raw is not None else as_tensor(self._raw_rows(j, X, y_enc), self._device, torch.float64)
        return self.preconditioners_[j].apply(G, self._features, j).to(torch.float64)

    def attribute(self, X, y=None, *, out=None):
        """Scores of every training example for each sample of ``X``.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            Labels defining the output on each sample; ``None`` uses the models' predictions.
        out : str, path-like or None, default=None
            A folder: the scores are written there block by block of ``block_size`` training
            examples (a :class:`skattr.store.ScoreStore`, returned instead of an array), so a
            matrix larger than memory is never held; blocks run through joblib (``n_jobs``)
            and a re-run with the same folder skips finished blocks.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_train), or ScoreStore with ``out``
            ``scores[j, i]``: the estimated effect of training example ``i`` on the output
            for ``X[j]`` (positive: it helped).
        """
        X = self._check_X(X)
        y_enc = self._labels(self.models_, X, self._check_y(y))
        if out is not None:
            from ..store import ScoreStore

            meta = {"attributor": self.train_fingerprint_, "store": str(getattr(self.store_, "path", None)),
                    "targets": data_hash(X, y), "weights": self.weights_.tolist()}
            st = ScoreStore(out, n_targets=X.shape[0], n_train=self.n_train_,
                            block_size=self._features.block_size, meta=meta)
            if self._dual():  # an n x n system (n < k: small): the scores at once
                S = self.attribute(X, y)
                for b in [b for _, b in st.missing()]:
                    st.write(b, S[:, slice(*st.block_range(b))])
                return st
            targets, scale = self._scoring_targets(X, y_enc)
            return score_blocks(targets, self._features, scale, out=st,
                                n_jobs=getattr(self, "n_jobs", None), verbose=self.verbose)
        t, n, M = X.shape[0], self.n_train_, len(self.models_)
        S = torch.empty(t, n, dtype=torch.float64, device=self._device)
        w = self.weights_
        equal = bool(np.all(w == w[0]))
        for m in progress(range(M), M, self.verbose, f"{self._name()}: scoring"):
            P = self.preconditioners_[m]
            G = as_tensor(self._target_rows(m, X, y_enc[m]), self._device, P.product_dtype(self._features))
            if not equal:
                G = G * float(w[m])
            P.scores(G, self._features, m, S, first=m == 0)
        if equal and w[0] == 1.0 / M:  # a mean over the models
            scale = self.q_ / M
        else:
            scale = self.q_ * (w[0] if equal else 1.0)
        S *= torch.from_numpy(scale).to(S.device)[None, :]
        return S.cpu().numpy()

    def _dual(self):
        return any(getattr(P, "solver_", None) == "dual" for P in self.preconditioners_)

    def _scoring_targets(self, X, y_enc):
        """``[(m, phi_m(X) M_m w_m)]`` in the products' precision and the per-column scale, as
        :meth:`attribute` combines them (for blockwise scoring)."""
        M, w = len(self.models_), self.weights_
        equal = bool(np.all(w == w[0]))
        targets = []
        for m in range(M):
            P = self.preconditioners_[m]
            G = as_tensor(self._target_rows(m, X, y_enc[m]), self._device, P.product_dtype(self._features))
            if not equal:
                G = G * float(w[m])
            targets.append((m, P.apply(G).to(P.product_dtype(self._features))))
        scale = self.q_ / M if equal and w[0] == 1.0 / M else self.q_ * (w[0] if equal else 1.0)
        return targets, np.asarray(scale, dtype=np.float64)

    def transform(self, X):
        """Attribute the models' own predictions on ``X``: ``attribute(X, y=None)``."""
        return self.attribute(X, None)

    def self_influence(self):
        """``tau(z_i, z_i)`` for every training example, (n_train,).

        Large values flag examples the model fits only through themselves (e.g. mislabelled
        ones); see :func:`skattr.metrics.mislabel_detection_auc`.
        """
        check_is_fitted(self, "preconditioners_")
        out = torch.zeros(self.n_train_, dtype=torch.float64, device=self._device)
        w = self.weights_
        equal = bool(np.all(w == w[0]))
        for m, P in enumerate(self.preconditioners_):
            s = P.self_scores(self._features, m)
            out += s if equal else s * float(w[m])
        M = len(self.models_)
        if equal and w[0] == 1.0 / M:  # a mean over the models
            return (out / M).cpu().numpy() * self.q_
        return out.cpu().numpy() * (self.q_ * (w[0] if equal else 1.0))

    def top_k(self, X, y=None, k=10):
        """The ``k`` training examples that helped (proponents) and hurt (opponents) most.

        Returns
        -------
        TopK
            ``proponents`` / ``opponents``: indices into the training set, (n_samples, k),
            strongest first; ``proponent_scores`` / ``opponent_scores``: their scores.

        The scores are streamed block by block of training examples (``n_jobs`` workers), so
        the ``(n_samples, n_train)`` matrix is never held.
        """
        if getattr(self, "_features", None) is None or self._dual():
            # scores without features (TracIn records), or an n x n system (n < k: small)
            from ..store import top_k_blocks

            S = self.attribute(X, y)
            return top_k_blocks([(0, S)], S.shape[0], S.shape[1], k)
        X = self._check_X(X)
        y_enc = self._labels(self.models_, X, self._check_y(y))
        targets, scale = self._scoring_targets(X, y_enc)
        return score_blocks(targets, self._features, scale, top_k=k,
                            n_jobs=getattr(self, "n_jobs", None), verbose=self.verbose)

    # ------------------------------------------------------------------ the attribution's kernel
    def kernel(self, X, Y=None):
        """The symmetric kernel this attribution defines, ``(n_X, n_Y)``.

        ``k(x, x') = sum_m w_m phi_m(x)^T M_m phi_m(x')``: the preconditioned inner product of
        the features, each at the models' predicted label (the same rule on both sides, so
        ``kernel(X)`` is a Gram matrix: symmetric, and positive semi-definite whenever every
        ``M_m`` is).  Unlike :meth:`attribute` it carries no per-example reweighting ``Q``.
        ``Y=None`` means ``Y = X``.
        """
        X = self._check_X(X)
        same = Y is None
        Y = X if same else self._check_X(Y)
        yX = self._labels(self.models_, X, None)
        yY = yX if same else self._labels(self.models_, Y, None)
        K = None
        for j in range(len(self.models_)):
            GY = as_tensor(self._raw_rows(j, Y, yY[j]), self._device, torch.float64)
            A = self._preconditioned_rows(j, X, yX[j], raw=GY if same else None)
            Kj = float(self.weights_[j]) * (A @ GY.T)
            K = Kj if K is None else K + Kj
        if same:
            K = 0.5 * (K + K.T)  # exact symmetry (the two products round differently)
        return K.cpu().numpy()


class AttributionKernel(TransformerMixin, BaseEstimator):
    """An attributor as a kernel transformer: ``transform(X) = attributor.kernel(X, X_fit)``.

    ``fit(X, y)`` fits the attributor on ``(X, y)`` and keeps ``X`` as the reference set;
    ``transform(X)`` returns the symmetric kernel the attribution defines
    (:meth:`BaseAttributor.kernel`) between ``X`` and the reference set, so
    ``fit_transform(X)`` is a Gram matrix and ``make_pipeline(AttributionKernel(TRAK(m)),
    SVC(kernel="precomputed"))`` or :class:`~skattr.surrogates.KernelSurrogate` (which wraps
    attributors in it) compare with the eNTK kernels drop-in.

    Parameters
    ----------
    attributor : BaseAttributor
        E.g. ``TRAK(model)``, ``TracIn(model)``, ``InfluenceFunction(model)``.

    Attributes
    ----------
    attributor_ : BaseAttributor
        The fitted attributor.
    model_ : TorchModel
        The network (its predictions are the surrogate's targets).
    n_features_in_, input_shape_ : as the attributor's.
    """

    _parameter_constraints = {"attributor": [BaseAttributor]}

    def __init__(self, attributor):
        self.attributor = attributor

    @property
    def model(self):
        return self.attributor.model

    def fit(self, X, y=None):
        self._validate_params()
        self.attributor_ = clone(self.attributor)
        if y is None and self.attributor_._fit_needs_y:
            y = self.attributor_.model.predict(X)
        self.attributor_.fit(X, y)
        self.X_fit_ = check_input(X)
        a = self.attributor_
        self.model_ = getattr(a, "model_", a.model)
        if not hasattr(self.model_, "module_") and (getattr(a, "models", None) is not None
                                                    or getattr(a, "subsets_", None) is not None):
            # an ensemble trained from (or given instead of) an untrained template: its first
            # member stands for the network
            self.model_ = a.models_[0]
        self.n_features_in_, self.input_shape_ = a.n_features_in_, a.input_shape_
        return self

    def transform(self, X):
        check_is_fitted(self, "attributor_")
        return self.attributor_.kernel(X, self.X_fit_)

    def fit_transform(self, X, y=None):
        return self.fit(X, y).attributor_.kernel(X)

    def __sklearn_clone__(self):
        return type(self)(clone(self.attributor))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        tags.non_deterministic = False
        return tags
