"""HYDRA (Chen et al., AAAI 2021): attribution by hypergradients through the SGD trajectory.

For every tracked training example ``i`` HYDRA carries ``d_i = d theta_T / d w_i``, the derivative
of the trained parameters with respect to the weight ``w_i`` of the example's loss in the
mean-reduced batch loss ``(1/|B_t|) sum_{j in B_t} w_j l_j``, by the forward recursion of
:mod:`skattr.hypergradients` (momentum buffer, weight decay and learning-rate schedule of
PyTorch's SGD; optional Hessian- or Gauss-Newton-vector products), and scores a target ``x`` by

    c_i(x) = -grad l(x, theta_T) . d_i,

the first-order increase of the loss at ``x`` when example ``i`` is removed (``w_i: 1 -> 0``):
positive means the example helped, as for every skattr attributor.  (The paper's
``(N/B) grad l_i`` injection with a final ``1/N`` gives the same number.)
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .. import gradients as _grad
from .. import hypergradients as _hg
from .._fingerprint import data_hash
from .._validation import check_fitted_shape, check_input, check_memory, seed_from_random_state
from ..featurize import encode_targets
from ..model import TorchModel
from ..outputs import make_output
from ..projection import KINDS, Projector
from ..training import Callback, TrajectoryRecorder, learning_rate_at
from .base import BaseAttributor

__all__ = ["HYDRA"]

_OWN_PREDICTION = (
    "y=None scores the loss at the network's own prediction, and its gradient is zero for every "
    "target here (as for a squared error, e.g. regression): every score would be 0. Pass the "
    "targets' labels: {where}."
)


def _copy_trajectory(rec):
    """A copy of a recorder with lists of its own; the checkpoints, batches and optimizer states
    in them are shared (the replay reads them and copies what it modifies)."""
    out = copy.copy(rec)
    for k, v in vars(rec).items():
        if isinstance(v, list):
            setattr(out, k, list(v))
    return out


class _Hook(Callback):
    """Builds a :class:`~skattr.hypergradients.RecursionHook` on the live network inside
    ``TorchModel.fit`` and delegates to it.  Not copied by ``copy.deepcopy`` (``TorchModel.fit``
    copies its callbacks)."""

    def __init__(self, build, X, y, model):
        self.build, self.X, self.y, self.model = build, X, y, model
        self.inner = None

    def __deepcopy__(self, memo):
        return self

    def on_train_begin(self, state):
        mu, wd = _hg.check_sgd_optimizer(state.optimizer)
        Xt = self.model.to_tensor(self.X)
        yt = self.model.encode_y(self.y, Xt.shape[0])
        self.inner = self.build(state.module, mu, wd, Xt, yt)

    def on_batch_begin(self, state):
        _hg.check_batch_weights(state.batch_weights, state.step)
        self.inner.on_batch_begin(state)

    def on_batch_end(self, state):
        self.inner.on_batch_end(state)

    def on_train_end(self, state):
        self.inner.on_train_end(state)


class HYDRA(BaseAttributor):
    """HYDRA: hypergradient training-data attribution through the SGD trajectory.

    Follows the training run of ``model`` (PyTorch SGD with momentum, weight decay, a
    learning-rate schedule and seeded batch order, as :meth:`TorchModel.fit` trains) and carries,
    for every tracked training example ``i``, the hypergradient ``d_i = d theta_T / d w_i`` with
    respect to the weight of its loss in the mean-reduced batch loss; scores are
    ``c_i(x) = -grad l(x, theta_T) . d_i`` (positive: the example lowered the loss at ``x``).
    See the HYDRA page of the documentation (``hydra.html``) for the recursion, its signs and
    scales.

    Parameters
    ----------
    model : TorchModel
        The network and its training recipe (``epochs``, ``batch_size``, ``lr``, ``momentum``,
        ``weight_decay``, ``lr_schedule``, ``random_state``).  Unless ``trajectory`` is given, a
        clone is re-initialised and trained on the data passed to :meth:`fit` (``model_``): an
        already fitted model's network is not used (``UserWarning``); to attribute a run of
        your own, record it with :class:`~skattr.training.TrajectoryRecorder` and pass
        ``trajectory``.  Runs with weighted batches (a callback's ``plan_epoch`` returning loss
        weights) are refused.
    hessian : {"none", "gauss-newton", "exact"}, default="none"
        The curvature term ``H_t d_i`` of the recursion: dropped (HYDRA's Hessian-free
        *approximation*, linear with scalar coefficients: the only one that can be projected or
        replayed lean; its ``d_i`` is not the derivative of the run, and beyond short runs or
        small step sizes its scores can be several times the exact ones and rank the examples
        differently: see the accuracy section of the HYDRA page and ``benchmarks/README.md``;
        use ``"exact"`` (or ``"gauss-newton"``) on a tracked subset to check),
        the batch loss's generalised Gauss-Newton matrix, or its exact Hessian (Hessian-vector
        products by ``torch.func``; for small models).  The curvature modes carry full
        parameter vectors for every tracked example and need ``model.params=None``.
    projection_dim : int or None, default=None
        Carry ``P d_i`` (``k`` numbers per example) instead of ``d_i``: exact for the projection,
        since the Hessian-free recursion is linear.  ``None``: full parameter vectors.
    projection : {"kronecker", "factored", "rademacher", "gaussian", "sparse"}, default="kronecker"
        Kind of projection (:mod:`skattr.projection`).
    mode : {"vector", "lean"}, default="vector"
        ``"vector"`` keeps ``d_i`` (or ``P d_i``) and attributes any target; ``"lean"`` keeps one
        scalar per training example and target for the targets given to :meth:`fit`
        (``X_target``, ``y_target``) through a deterministic replay of the training
        (O(n_train x n_targets) memory, or O(n_train) with ``target_reduction="mean"``;
        exact inner products, Hessian-free).
    target_reduction : {"none", "mean"}, default="none"
        ``mode="lean"``: ``"none"`` scores every target given to :meth:`fit` (one row each);
        ``"mean"`` scores one objective, the mean of the targets' losses
        ``(1/m) sum_j l(x_j, theta_T)``: one scalar per training example (O(n_train) memory),
        the mean of the ``"none"`` rows, computed against the mean target gradient (the
        recursion is linear), so the replay's products do not grow with the number of targets.
    lean_self_influence : bool, default=True
        ``mode="lean"``: also compute the self-influence during the replay (a record of every
        example's gradient at ``theta_T`` and one dot product per example and step).  ``False``
        skips it; :meth:`self_influence` then raises.  Vector mode always has it.
    track : array-like of int or None, default=None
        Indices of the training examples to carry; ``None``: all.  Scores of the others are NaN.
    trajectory : TrajectoryRecorder or None, default=None
        Replay this recorded run (its first checkpoint, batches, learning rates and optimizer
        settings) instead of training; checked step by step against the recorded losses and
        checkpoints (a different data set or architecture raises a ``ValueError``).  The
        recording is followed even where ``model``'s recipe differs (a ``UserWarning`` names
        the differences); ``model_``'s parameters stay ``model``'s.
    batch_size : int or None, default=None
        Examples per gradient batch when scoring targets (default: the model's
        ``batch_size_eval``).
    random_state : int, RandomState instance or None, default=0
        Seed of the projection.
    verbose : int, default=0

    Attributes
    ----------
    model_ : TorchModel
        The trained network (``theta_T``).
    models_ : list of TorchModel
        ``[model_]``.
    trajectory_ : TrajectoryRecorder
        The run followed: first checkpoint, batches and learning rate of every step.
    hypergradients_ : ndarray of shape (n_tracked, k) or None
        ``d_i`` (``P d_i / sqrt(k)`` with a projection), rows in the order of ``track_``
        (``mode="vector"``).
    engine_ : dict
        ``{"engine", "reason"}``: where the training steps' per-example gradients came from
        (``"step capture"``: the step's own forward and backward pass; ``"separate pass"``: a
        second pass per step, and why; ``"curvature"``: the exact / Gauss-Newton recursion).
        Printed with ``verbose=1``.
    track_ : ndarray of int
        The tracked training indices.
    lean_scores_ : ndarray of shape (n_targets, n_train) or (1, n_train), or None
        ``mode="lean"``: the scores of the targets given to :meth:`fit`, one row each
        (``target_reduction="none"``) or one row for their mean loss (``"mean"``).
    coefficients_ : ndarray of shape (n_steps,)
        ``a_t`` of the Hessian-free closed form ``d_i = sum_{t: i in B_t} a_t / |B_t|
        grad l_i(theta_t)``.
    feature_dim_ : int
    n_train_, n_features_in_, input_shape_, train_fingerprint_

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.hydra import HYDRA
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-4, random_state=0)
    >>> hydra = HYDRA(model, projection_dim=256).fit(X[:300], y[:300])
    >>> hydra.attribute(X[300:305], y[300:305]).shape
    (5, 300)
    >>> hydra.self_influence().shape
    (300,)
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "hessian": [StrOptions({"none", "gauss-newton", "exact"})],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions(set(KINDS))],
        "mode": [StrOptions({"vector", "lean"})],
        "target_reduction": [StrOptions({"none", "mean"})],
        "lean_self_influence": ["boolean"],
        "track": ["array-like", None],
        "trajectory": [TrajectoryRecorder, None],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }
    _models_param = ("trajectory",)
    _fit_needs_y = True

    def __init__(
        self,
        model,
        *,
        hessian="none",
        projection_dim=None,
        projection="kronecker",
        mode="vector",
        target_reduction="none",
        lean_self_influence=True,
        track=None,
        trajectory=None,
        batch_size=None,
        random_state=0,
        verbose=0,
    ):
        self.model = model
        self.hessian = hessian
        self.projection_dim = projection_dim
        self.projection = projection
        self.mode = mode
        self.target_reduction = target_reduction
        self.lean_self_influence = lean_self_influence
        self.track = track
        self.trajectory = trajectory
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ checks
    def _check_config(self):
        if self.hessian != "none":
            if self.projection_dim is not None:
                raise ValueError(
                    f"hessian={self.hessian!r} carries full parameter vectors (the curvature mixes "
                    "the directions a projection drops); projection_dim must be None. Use "
                    "hessian='none' for projected hypergradients."
                )
            if self.mode == "lean":
                raise ValueError("mode='lean' is the Hessian-free closed form; use hessian='none'.")
            if self.model.params is not None:
                raise ValueError(
                    f"hessian={self.hessian!r} follows every trainable parameter; the model's "
                    f"params={self.model.params!r} must be None."
                )
        if self.mode == "lean" and self.projection_dim is not None:
            raise ValueError("mode='lean' computes exact inner products; projection_dim must be None.")
        if self.mode != "lean" and self.target_reduction != "none":
            raise ValueError(
                f"target_reduction={self.target_reduction!r} is for mode='lean' (targets fixed at "
                "fit); in mode='vector' average the rows of attribute(X, y)."
            )
        if self.mode != "lean" and not self.lean_self_influence:
            raise ValueError(
                "lean_self_influence=False is for mode='lean'; mode='vector' computes the "
                "self-influence from the hypergradients at the end of fit."
            )

    def _check_track(self, n):
        if self.track is None:
            return np.arange(n)
        t = np.asarray(self.track)
        if t.dtype == bool:
            if t.shape != (n,):
                raise ValueError(f"A boolean track must have n_train={n} entries, got shape {t.shape}.")
            return np.flatnonzero(t)
        if t.ndim != 1 or t.size == 0 or t.dtype.kind not in "iu":
            raise ValueError(f"track must be a non-empty 1-d array of training indices, got {self.track!r}.")
        bad = t[(t < 0) | (t >= n)]
        if bad.size:
            raise ValueError(
                f"track holds indices {bad[:5].tolist()} outside the training set [0, {n})."
            )
        if np.unique(t).size != t.size:
            raise ValueError("track holds repeated indices.")
        return t.astype(np.int64)

    def _check_trajectory(self, rec, n):
        if not hasattr(rec, "checkpoints_") or not rec.checkpoints_:
            raise ValueError("The TrajectoryRecorder has not recorded a training run yet.")
        _hg.check_sgd_state(rec.optimizer_states_[0])
        _hg.check_unweighted(rec)
        if int(rec.n_train_) != n:
            raise ValueError(
                f"The trajectory was recorded on {rec.n_train_} training examples, fit got {n}: "
                "replay it on the same training set."
            )
        if not rec.batches_:
            raise ValueError("The trajectory holds no training step.")
        hi = max(int(np.max(b)) for b in rec.batches_)
        if hi >= n:
            raise ValueError(f"The trajectory's batches index example {hi}, beyond n_train={n}.")

    def _warn_recipe(self, rec, n):
        """``UserWarning`` when the model's recipe is not the recorded run's."""
        m, diff = self.model, []
        bs = getattr(rec, "batch_size_", None)
        if bs is not None and int(bs) != int(m.batch_size):
            diff.append(f"batch_size {m.batch_size} (recorded {bs})")
        for name in ("momentum", "weight_decay"):
            r = getattr(rec, name + "_", None)
            if r is not None and not math.isclose(float(r), float(getattr(m, name)), rel_tol=1e-9):
                diff.append(f"{name} {getattr(m, name)} (recorded {r})")
        steps = len(rec.batches_)
        planned = self._planned_lrs(n, int(bs or m.batch_size))  # at the recorded batch size
        if any(type(cb).plan_epoch is not Callback.plan_epoch for cb in (m.callbacks or ())):
            pass  # a callback plans the batches: the number of steps is its own
        elif steps != len(planned):
            diff.append(f"epochs {m.epochs} ({len(planned)} steps; recorded {steps} steps)")
        elif not np.allclose(planned, np.asarray(rec.lrs_, dtype=float), rtol=1e-9, atol=0):
            diff.append(f"lr {m.lr} / lr_schedule {m.lr_schedule!r} (the recorded learning rates differ)")
        if diff:
            warnings.warn(
                "HYDRA follows the recorded run (trajectory=...), not the model's training recipe, "
                f"which differs from it: {'; '.join(diff)}. The scores and model_'s network are "
                "those of the recording; model_'s parameters (epochs, lr, ...) stay the model's.",
                UserWarning, stacklevel=3,
            )

    # ------------------------------------------------------------------ fit
    def _projector(self, model):
        if self.projection_dim is None:
            return None
        return Projector(self.projection, int(self.projection_dim), self._seed,
                         device=model.device_, dtype=model.torch_dtype_)

    def _build(self, mu, wd, net, source, coefficients):
        k, tr, n = self.feature_dim_, self.track_, self.n_train_
        if self.hessian == "none":
            check_memory(len(tr) * k * 8, f"HYDRA's hypergradients of {len(tr)} examples x {k} dimensions",
                         hint="Use projection_dim=k, mode='lean' or track a subset.")
            return _hg.ClosedFormRecursion(source, tr, n, coefficients, k, self.model_.device_)
        check_memory(3 * len(tr) * k * 8, f"HYDRA's hypergradients of {len(tr)} examples x {k} parameters",
                     hint="Track a subset (track=...) or use hessian='none' with projection_dim.")
        return _hg.DenseRecursion(source, tr, n, mu, wd, net, self.hessian)

    def _fresh_model(self, X, y):
        """A fitted copy of ``model`` without training (its network at its initialisation)."""
        m = clone(self.model).set_params(epochs=0, callbacks=None)
        m.fit(X, y)
        return m.set_params(epochs=self.model.epochs, callbacks=self.model.callbacks)

    def fit(self, X, y, X_target=None, y_target=None):
        """Follow the training on ``(X, y)`` and compute the hypergradients.

        Parameters
        ----------
        X : array-like or tensor of shape (n_train, ...)
        y : array-like of shape (n_train,)
        X_target, y_target : array-like, default=None
            ``mode="lean"``: the targets scored (``y_target=None``: the trained network's
            predictions); :meth:`attribute` then returns their scores.

        Returns
        -------
        self
        """
        self._validate_params()
        self._check_config()
        X, y = self._check_fit_input(X, y)
        n = int(X.shape[0])
        self._seed = seed_from_random_state(self.random_state)
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        self.n_train_ = n
        self.train_fingerprint_ = data_hash(X, y)
        self.output_ = make_output("loss")
        self.track_ = self._check_track(n)
        if self.mode == "lean" and X_target is None:
            raise ValueError("mode='lean' scores the targets given at fit: call fit(X, y, X_target=..., y_target=...).")
        if self.mode != "lean" and X_target is not None:
            raise ValueError("X_target is for mode='lean'; in mode='vector' attribute(X, y) scores any target.")
        _hg.check_followable(self.model.module)

        rec = self.trajectory
        if rec is None and hasattr(self.model, "module_"):
            warnings.warn(
                "The model passed to HYDRA is already fitted, but HYDRA does not use its trained "
                "network: it re-initialises a clone (seeded by the model's random_state) and trains "
                "it with the model's recipe (epochs, lr, batch_size, momentum, weight_decay, "
                "lr_schedule), following that run. To attribute a run of your own, train with "
                "callbacks=[TrajectoryRecorder()] and pass HYDRA(model, trajectory=recorder).",
                UserWarning, stacklevel=2,
            )
        replayed = rec is not None or self.mode == "lean"
        if rec is None and self.mode == "vector":
            self._fit_training(X, y)
        else:
            if rec is None:  # lean: train and record first, then replay
                cbs = [cb for cb in (self.model.callbacks or []) if not isinstance(cb, TrajectoryRecorder)]
                model = clone(self.model).set_params(callbacks=[*cbs, TrajectoryRecorder()])
                model.fit(X, y)
                rec = next(cb for cb in model.callbacks_ if isinstance(cb, TrajectoryRecorder))
                self.model_ = model
            else:
                self._check_trajectory(rec, n)
                self._warn_recipe(rec, n)
                rec = _copy_trajectory(rec)
                self.model_ = None
            self.trajectory_ = rec
            self._fit_replay(X, y, X_target, y_target)
        self.replayed_ = replayed
        self.models_ = [self.model_]
        self.model_.prepare(X[:1])
        self.output_.check(self.model_)
        return self

    def _source(self, model):
        return _hg.GradientSource(model, self.output_, self._projector(model))

    def _feature_dim(self, model, X, y):
        if self.projection_dim is not None:
            return int(self.projection_dim)
        src = _hg.GradientSource(model, self.output_, None)
        xb = model.to_tensor(X[:1])
        return int(sum(r.n_params for r in src.records(model.network(), xb, model.encode_y(y[:1], 1))))

    def _planned_lrs(self, n, batch_size=None):
        """The learning rate of every step of ``model``'s recipe on ``n`` examples (in batches of
        ``batch_size``; default the model's)."""
        m = self.model
        total = int(m.epochs) * -(-n // int(batch_size or m.batch_size))
        return [float(learning_rate_at(float(m.lr), m.lr_schedule, s, total)) for s in range(total)]

    def _fit_training(self, X, y):
        cbs = [cb for cb in (self.model.callbacks or []) if not isinstance(cb, TrajectoryRecorder)]
        recorder = TrajectoryRecorder()
        model = clone(self.model)
        self.output_.check(model)
        lrs = self._planned_lrs(self.n_train_)
        state = {}

        def build(net, mu, wd, Xt, yt):
            model.module_ = net  # the live network, for the feature dimension only
            self.model_ = model
            self.feature_dim_ = self._feature_dim(model, X, y)
            del model.module_
            state["source"] = src = self._source(model)
            coef = _hg.lean_coefficients(lrs, mu, wd)
            recursion = self._build(mu, wd, net, src, coef)
            state["recursion"] = recursion
            return _hg.RecursionHook(recursion, src, Xt, yt, net, lrs=lrs)

        hook = _Hook(build, X, y, model)
        model.set_params(callbacks=[*cbs, recorder, hook])
        model.fit(X, y)
        model.set_params(callbacks=self.model.callbacks)
        model.callbacks_ = [cb for cb in model.callbacks_ if cb is not hook]
        self._set_engine(hook.inner)
        self.model_ = model
        self.trajectory_ = next(cb for cb in model.callbacks_ if isinstance(cb, TrajectoryRecorder))
        self._finish_vector(state["recursion"], X, y, state["source"])

    def _set_engine(self, hook):
        """``engine_``: where the per-example gradients of the training steps came from."""
        self.engine_ = dict(hook.engine)
        if self.verbose:
            print(f"[skattr] HYDRA: gradient engine {self.engine_['engine']!r} "
                  f"({self.engine_['reason']})", flush=True)

    def _finish_vector(self, recursion, X, y, source):
        D = recursion.finish()
        # the sum is finite when every entry is (an overflow of finite entries is then checked)
        if not math.isfinite(float(D.sum())) and not bool(torch.isfinite(D).all()):
            raise FloatingPointError(
                "The hypergradients became NaN or infinite: the recursion diverged (with "
                f"hessian={self.hessian!r}, a step size too large for the curvature); lower the learning rate."
            )
        self.hypergradients_ = D.cpu().numpy()
        self._source_ = source
        self.coefficients_ = _hg.lean_coefficients(self.trajectory_.lrs_, self.trajectory_.momentum_,
                                                   self.trajectory_.weight_decay_)
        self.lean_scores_ = None
        # self-influence: -grad l_i(theta_T) . d_i, in row blocks of at most 8M numbers
        rb = max(1, (1 << 23) // max(1, D.shape[1]))
        si = []
        for i in range(0, len(self.track_), rb):
            tr = self.track_[i : i + rb]
            si.append(-(self._target_features(X[tr], y[tr]) * D[i : i + rb]).sum(1))
        self.self_influence_ = torch.cat(si).cpu().numpy()

    def _fit_replay(self, X, y, X_target, y_target):
        rec = self.trajectory_
        mu, wd = _hg.check_sgd_state(rec.optimizer_states_[0])
        self.coefficients_ = _hg.lean_coefficients(rec.lrs_, mu, wd)
        fresh = self._fresh_model(X, y)
        self.output_.check(fresh)
        Xt = fresh.to_tensor(X)
        yt = fresh.encode_y(y, Xt.shape[0])
        self.feature_dim_ = self._feature_dim(fresh, X, y)
        if self.mode == "vector":
            self.model_ = fresh
            src = self._source(fresh)
            recursion = self._build(mu, wd, fresh.module_, src, self.coefficients_)
            hook = _hg.RecursionHook(recursion, src, Xt, yt, fresh.module_)
            _hg.replay(fresh, rec, Xt, yt, hook, verbose=self.verbose)
            self._set_engine(hook)
            self.model_ = fresh
            self._finish_vector(recursion, X, y, src)
            return
        # lean: theta_T first (trained above, or the last checkpoint / a plain replay)
        final = self.model_
        if final is None:
            last_step, last_sd = rec.checkpoints_[-1]
            final = copy.deepcopy(fresh)
            if int(last_step) == len(rec.batches_):
                final.module_.load_state_dict(last_sd)
            else:
                _hg.replay(final, rec, Xt, yt, None)
        self.model_ = final
        src = _hg.GradientSource(final, self.output_, None)
        Xtar = check_input(X_target)
        check_fitted_shape(Xtar, self.input_shape_, name="X_target")
        ytar = None if y_target is None else np.asarray(y_target)
        yenc = encode_targets([final], self.output_, Xtar, ytar, self.batch_size)[0]
        self.target_fingerprint_ = data_hash(Xtar, ytar)
        net_T = final.network()
        rx = self._records(src, net_T, final.to_tensor(Xtar), yenc)
        if ytar is None and not bool((_hg.row_dots(rx, rx) != 0).any()):
            raise ValueError(_OWN_PREDICTION.format(where="fit(X, y, X_target, y_target=...)"))
        rself = None
        if self.lean_self_influence:
            tr = torch.as_tensor(self.track_)
            rself = self._records(src, net_T, Xt[tr], yt[tr])
        recursion = _hg.LeanRecursion(src, self.track_, self.n_train_, self.coefficients_, rx,
                                      rself, reduction=self.target_reduction)
        hook = _hg.RecursionHook(recursion, src, Xt, yt, fresh.module_)
        net = _hg.replay(fresh, rec, Xt, yt, hook, verbose=self.verbose)
        self._set_engine(hook)
        ref = dict(final.network().named_parameters())
        err = max(_hg._rel_diff(p, ref[k]) for k, p in net.named_parameters())
        if err > 1e-4:
            raise ValueError(
                f"The lean replay did not reproduce the trained network (relative difference {err:.2e}): "
                "training is not deterministic here, so the replayed gradients are not the run's."
            )
        recursion.flush()
        scores = recursion.scores.cpu().numpy()
        S = np.full((scores.shape[0], self.n_train_), np.nan)
        S[:, self.track_] = scores
        self.lean_scores_ = S
        self.hypergradients_ = None
        self.self_influence_ = recursion.self_scores.cpu().numpy() if rself is not None else None

    def _records(self, src, net, Xt, yt):
        bs = int(self.batch_size or src.model.batch_size_eval)
        parts = []
        for i in range(0, Xt.shape[0], bs):
            r = src.records(net, Xt[i : i + bs], yt[i : i + bs])
            if isinstance(r, _grad.DeferredRecords):
                r = [x for _, _, c in r.chunks() for x in [c]]
                parts.extend(r)
            else:
                parts.append(r)
        return _hg.cat_records(parts)

    # ------------------------------------------------------------------ scoring
    def _check_X(self, X):
        check_is_fitted(self, "model_")
        X = check_input(X)
        if X.ndim == 2 and len(self.input_shape_) == 1 and X.shape[1] != self.input_shape_[0]:
            raise ValueError(
                f"X has {X.shape[1]} features, but HYDRA is expecting {self.input_shape_[0]} "
                "features as input (the training set's)."
            )
        check_fitted_shape(X, self.input_shape_)
        return X

    def _target_features(self, X, y_enc_or_labels, encoded=False):
        m = self.model_
        yenc = y_enc_or_labels if encoded else encode_targets([m], self.output_, X, y_enc_or_labels,
                                                              self.batch_size)[0]
        Xt = m.to_tensor(X)
        net = m.network()
        bs = int(self.batch_size or m.batch_size_eval)
        return torch.cat([self._source_.features(net, Xt[i : i + bs], yenc[i : i + bs])
                          for i in range(0, Xt.shape[0], bs)])

    def attribute(self, X, y=None):
        """Scores of every training example for each sample of ``X``.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
            ``mode="lean"``: the targets given to :meth:`fit` (or ``None``); anything else
            raises.
        y : array-like of shape (n_samples,), default=None
            Labels defining the loss on each sample; ``None`` uses the trained network's
            predictions.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_train), or (1, n_train)
            ``-grad l(x, theta_T) . d_i``: the first-order increase of the loss at ``X[j]`` if
            training example ``i`` is removed (positive: it helped).  NaN for untracked examples.
            With ``mode="lean", target_reduction="mean"``: one row, the increase of the mean
            loss over the targets (the mean of the rows ``"none"`` would return).
        """
        if self.mode == "lean":
            check_is_fitted(self, "lean_scores_")
            if X is not None:
                X = self._check_X(X)
                if data_hash(X, None if y is None else np.asarray(y)) != self.target_fingerprint_:
                    raise ValueError(
                        "mode='lean' scores only the targets given to fit (X_target, y_target); "
                        "refit with these targets or use mode='vector'."
                    )
            return self.lean_scores_.copy()
        X = self._check_X(X)
        G = self._target_features(X, self._check_y(y))
        if y is None and not bool((G != 0).any()):
            raise ValueError(_OWN_PREDICTION.format(where="attribute(X, y) instead of attribute(X) or transform(X)"))
        D = torch.from_numpy(self.hypergradients_).to(G.device)
        S = np.full((X.shape[0], self.n_train_), np.nan)
        S[:, self.track_] = (-(G @ D.T)).cpu().numpy()
        return S

    def transform(self, X):
        """``attribute(X, y=None)``: the trained network's own predictions."""
        return self.attribute(X, None)

    def self_influence(self):
        """``-grad l_i(theta_T) . d_i`` for every training example, (n_train,) (NaN if untracked).

        How much up-weighting example ``i`` lowered its own final loss: large for examples the
        network fits only through themselves (e.g. mislabelled ones); see
        :func:`skattr.metrics.mislabel_detection_auc`.  Available in both modes (lean: from a
        per-example record of ``grad l_i(theta_T)`` kept during the replay; a ``ValueError``
        with ``lean_self_influence=False``).
        """
        check_is_fitted(self, "self_influence_")
        if self.self_influence_ is None:
            raise ValueError(
                "The self-influence was not computed: this HYDRA was fitted with "
                "lean_self_influence=False; refit with lean_self_influence=True."
            )
        out = np.full(self.n_train_, np.nan)
        out[self.track_] = self.self_influence_
        return out

    def top_k(self, X, y=None, k=10):
        return super().top_k(X, y, k)

    top_k.__doc__ = BaseAttributor.top_k.__doc__

    def kernel(self, X, Y=None):
        """Not defined: HYDRA's scores pair a final-model target gradient with a trajectory
        hypergradient, which is not a symmetric kernel of two inputs."""
        raise NotImplementedError(
            "HYDRA has no symmetric attribution kernel (targets and training examples enter "
            "asymmetrically); use TracIn or TRAK as a kernel."
        )
