"""TracIn (Pruthi et al., 2020): attribution by gradient similarity summed over checkpoints.

TracInCP scores training example ``z_i`` for a target ``x`` as

    tau(x, z_i) = sum_t eta_t  grad l(x; theta_t) . grad l(z_i; theta_t),

``theta_t`` the checkpoints saved during training and ``eta_t`` the learning rate in effect at
each.  It is :class:`~skattr.estimators.base.BaseAttributor` with the loss as output, the
checkpoints as models, their learning rates as weights and the identity preconditioner; with
``projection_dim`` the gradients are randomly projected (captum's ``TracInCPFastRandProj`` does
this for the last layer only); ``last_layer=True`` restricts the gradients to the last Linear
layer's weight (captum's ``TracInCPFast``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted

from .. import gradients as _grad
from .._checks import nonfinite_parameters
from .._validation import check_memory
from ..ensemble import load_member
from ..featurize import progress
from ..parallel import n_workers, run_blocks
from ..preconditioners import Identity
from ..training import TrajectoryRecorder
from .base import BaseAttributor

__all__ = ["TracIn"]


def _records(fz, X, y_enc):
    """``[(b0, b1, records)]``: the gradient records of ``X`` under a featuriser's model,
    batch by batch."""
    Xt = fz.model.to_tensor(X)
    out = []
    for b0 in range(0, Xt.shape[0], fz.batch_size):
        b1 = min(Xt.shape[0], b0 + fz.batch_size)
        out.append((b0, b1, fz.records(Xt[b0:b1], None if y_enc is None else y_enc[b0:b1])))
    return out


def _add_gram(K, w, fz, X, y_enc, train):
    """``K += w G(X) G(train)^T`` from records, batch block by batch block (float64)."""
    for c0, c1, rx in _records(fz, X, y_enc):
        for b0, b1, rb in train:
            K[c0:c1, b0:b1] += w * _grad.gram(rx, rb).to(torch.float64)
    return K


def _checkpoint_gram(fz, w, X, y_enc, train, Y=None, y_Y=None):
    """One checkpoint's term ``w G(X) G(train)^T`` (t, n) in a worker; ``train=None``: the
    records of ``(Y, y_Y)``, computed here."""
    if train is None:
        train = _records(fz, Y, y_Y)
    K = torch.zeros(X.shape[0], train[-1][1], dtype=torch.float64, device=fz.model.device_)
    return _add_gram(K, w, fz, X, y_enc, train)


class TracIn(BaseAttributor):
    """TracInCP training-data attribution over training checkpoints (Pruthi et al., 2020).

    Parameters
    ----------
    model : TorchModel
        The network (its architecture and settings; the weights attributed are the
        checkpoints').  With ``checkpoints=None`` it must have been fitted with a
        :class:`~skattr.TrajectoryRecorder` in its ``callbacks``.
    checkpoints : None, "train", TrajectoryRecorder or list of (state_dict, learning_rate), default=None
        The checkpoints ``theta_t`` and their learning rates ``eta_t``.  ``None`` takes the
        recorder in ``model.callbacks_``; ``"train"`` trains a clone of ``model`` on the
        training set given to :meth:`fit` with a recorder added (``model_``); a recorder gives its checkpoints after the initial one
        with the learning rate of the step before each
        (:meth:`TrajectoryRecorder.tracin_checkpoints`).  In a list each state dict may also be
        a fitted TorchModel, an ``nn.Module`` or a path saved with ``torch.save``.
    projection_dim : int or None, default=None
        Dimension of the random projection of the gradients; ``None``: exact gradients.
    projection : {"kronecker", "factored", "rademacher", "gaussian", "sparse"}, default="kronecker"
        Kind of projection (:mod:`skattr.projection`).
    last_layer : bool, default=False
        Use only the weight of the network's last ``nn.Linear`` layer (as captum's
        ``TracInCPFast``; its bias is left out as there).
    output : "loss", "margin", "logit", class label or callable, default="loss"
        What is differentiated (:mod:`skattr.outputs`); TracIn is defined on the loss.
    store, block_size, method, batch_size, random_state, verbose
        As for :class:`~skattr.estimators.TRAK`: an on-disk feature store (resumable), store
        block size, gradient engine, gradient batch size, the projection's seed, progress bars.
    n_jobs : int or None, default=None
        joblib workers (``None``: the active ``joblib.parallel_config``'s, one by default).
        With ``projection_dim`` or ``store``: featurising (checkpoint, block of ``block_size``
        examples) pairs and scoring blocks, as for :class:`~skattr.estimators.TRAK`.  With
        exact scores from layer factors (``scoring_="records"``): one job per checkpoint for
        the training records at :meth:`fit` and for each checkpoint's term of
        :meth:`attribute` and :meth:`kernel`, the terms added in checkpoint order
        (``self_influence`` reads the kept records in this process).  The results do not
        depend on it.

    Attributes
    ----------
    models_ : list of TorchModel
        One model per checkpoint.
    model_ : TorchModel
        The trained network whose predictions label unlabelled samples (``model``, or its
        trained clone with ``checkpoints="train"``).
    learning_rates_ : ndarray of shape (n_checkpoints,)
        ``eta_t`` (also ``weights_``).
    preconditioners_ : list of Identity
    engine_ : dict
        The gradient engine that ran (``"engine"``) and why (``"reason"``).
    scoring_ : {"records", "features"}
        How scores are computed: ``"records"`` (exact gradients, no store) from the layers'
        gradient factors, no per-example gradient formed (for a Linear layer ``(d_x . d_i)
        (a_x . a_i)``); ``"features"``: from stored (projected) features.
    feature_dim_ : int
    n_train_, n_features_in_, input_shape_, train_fingerprint_

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel, TrajectoryRecorder
    >>> from skattr.estimators import TracIn
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=3, lr=0.1, callbacks=[TrajectoryRecorder()],
    ...                    random_state=0).fit(X[:300], y[:300])
    >>> tracin = TracIn(model, projection_dim=512).fit(X[:300], y[:300])
    >>> tracin.learning_rates_
    array([0.1, 0.1, 0.1])
    >>> tracin.attribute(X[300:305], y[300:305]).shape
    (5, 300)
    """

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "checkpoints": [list, tuple, TrajectoryRecorder, StrOptions({"train"}), None],
        "last_layer": ["boolean"],
        "output": [StrOptions({"loss", "margin", "logit"}), numbers.Integral, callable],
        "n_jobs": [numbers.Integral, None],
    }
    _models_param = ("checkpoints",)
    _fit_needs_y = True

    def __init__(
        self,
        model,
        *,
        checkpoints=None,
        projection_dim=None,
        projection="kronecker",
        last_layer=False,
        output="loss",
        store=None,
        block_size=4096,
        method="auto",
        batch_size=None,
        random_state=0,
        n_jobs=None,
        verbose=0,
    ):
        self.model = model
        self.checkpoints = checkpoints
        self.projection_dim = projection_dim
        self.projection = projection
        self.last_layer = last_layer
        self.output = output
        self.store = store
        self.block_size = block_size
        self.method = method
        self.batch_size = batch_size
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    def _member_names(self):
        return {"name": "checkpoints", "kind": "Checkpoint"}

    def _checkpoint_pairs(self, X, y):
        ck = self.checkpoints
        self.model_ = self.model
        if isinstance(ck, str):  # "train"
            cbs = [cb for cb in (self.model.callbacks or []) if not isinstance(cb, TrajectoryRecorder)]
            self.model_ = clone(self.model).set_params(callbacks=[*cbs, TrajectoryRecorder()])
            self.model_.fit(X, y)
            ck = None
        if ck is None:
            recs = [cb for cb in getattr(self.model_, "callbacks_", []) or []
                    if isinstance(cb, TrajectoryRecorder) and hasattr(cb, "checkpoints_")]
            if not recs:
                raise ValueError(
                    "TracIn needs training checkpoints: fit the model with "
                    "callbacks=[TrajectoryRecorder()], or pass checkpoints=[(state_dict, "
                    "learning_rate), ...]."
                )
            ck = recs[0]
        if isinstance(ck, TrajectoryRecorder):
            if not hasattr(ck, "checkpoints_"):
                raise ValueError("The TrajectoryRecorder has not recorded a training run yet.")
            pairs = ck.tracin_checkpoints()
            if not pairs:
                raise ValueError("The TrajectoryRecorder holds no checkpoint after the initial one.")
            return pairs
        if len(ck) == 0:
            raise ValueError("checkpoints is an empty list.")
        pairs = []
        for i, item in enumerate(ck):
            ok = isinstance(item, (tuple, list)) and len(item) == 2
            if ok and isinstance(item[0], numbers.Integral) and isinstance(item[1], Mapping):
                ok = False  # a recorder's (step, state_dict): no learning rate
            if not ok or isinstance(item[1], bool) or not isinstance(item[1], numbers.Real):
                raise ValueError(
                    f"checkpoints[{i}] must be a (state_dict, learning_rate) pair; got "
                    f"{type(item).__name__}{'' if not isinstance(item, (tuple, list)) else ' of ' + ', '.join(type(v).__name__ for v in item)}. "
                    "TracIn weights each checkpoint by its learning rate; pass "
                    "TrajectoryRecorder.tracin_checkpoints() or add the rates."
                )
            lr = float(item[1])
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"checkpoints[{i}] has learning rate {item[1]!r}; it must be > 0.")
            pairs.append((item[0], lr))
        return pairs

    def _last_weight(self, member):
        names = [n for n, m in member.network().named_modules() if isinstance(m, torch.nn.Linear)]
        if not names:
            raise ValueError("last_layer=True needs an nn.Linear layer; the network has none.")
        return f"{names[-1]}.weight" if names[-1] else "weight"

    def _fit_models(self, X, y):
        pairs = self._checkpoint_pairs(X, y)
        models = []
        for i, (sd, _) in enumerate(pairs):
            m = load_member(self.model_, sd, f"checkpoints[{i}]")
            bad = nonfinite_parameters(m.network())
            if bad:
                raise FloatingPointError(
                    f"checkpoints[{i}] has NaN or infinite parameters ({', '.join(bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}): training diverged before this "
                    "checkpoint; drop it or lower the learning rate."
                )
            if self.last_layer:
                m.set_params(params=self._last_weight(m))
            models.append(m)
        self.learning_rates_ = np.asarray([lr for _, lr in pairs], dtype=np.float64)
        return models, None

    def _prediction_models(self):
        # unlabelled samples are attributed at the trained network's prediction
        return [self.model_]

    def _model_weights(self):
        return self.learning_rates_

    # ------------------------------------------------------------------ exact: from layer factors
    # With exact gradients and no store, scores are inner products of per-example gradients,
    # which the gradient records give without forming any gradient: for a Linear layer
    # <d_x a_x^T, d_i a_i^T> = (d_x . d_i)(a_x . a_i) (skattr.gradients.gram).  The training
    # set's records (factors, O(n (d_in + d_out)) per layer) are kept instead of n x p features.
    def _fit_features(self, X, y_enc):
        if self.projection_dim is not None or self.store is not None:
            self.scoring_ = "features"
            return super()._fit_features(X, y_enc)
        self.scoring_ = "records"
        M, n = len(self.models_), self.n_train_
        self.feature_dim_ = self._featurizer(0).dim(X, y_enc[0])
        self._report_engine(self._featurizer(0), X, y_enc[0])
        if n_workers(self.n_jobs) == 1:
            self._train_records = [
                self._record_blocks(j, X, y_enc[j])
                for j in progress(range(M), M, self.verbose, "TracIn: gradient records")]
        else:  # one job per checkpoint
            args = [(self._featurizer(j), X, y_enc[j]) for j in range(M)]
            self._train_records = list(run_blocks(
                _records, args, [f"the gradient records of checkpoint {j}" for j in range(M)],
                n_jobs=self.n_jobs, verbose=self.verbose, desc="TracIn: gradient records"))
        nbytes = sum(r.nbytes() for recs in self._train_records for _, _, rs in recs for r in rs)
        check_memory(nbytes, f"TracIn's gradient records of {n} examples x {M} checkpoints",
                     hint="Use projection_dim=k (and store='dir' for large sets).")
        self._features = None
        self.store_ = None
        self.preconditioners_ = [Identity(self._device) for _ in range(M)]
        self.q_models_ = np.ones((M, n))
        self.q_ = np.ones(n)
        self.weights_ = np.asarray(self._model_weights(), dtype=np.float64)

    def _record_blocks(self, j, X, y_enc):
        return _records(self._featurizer(j), X, y_enc)

    def _record_gram(self, X, y_enc, Y=None, yY=None):
        """``sum_j w_j G_j(X) G_j(train)^T`` from records ((t, n) float64 tensor); ``train``:
        the kept training records, or those of ``(Y, yY)``.  With more than one worker one job
        per checkpoint, the terms added in checkpoint order (the same sums as one process)."""
        M = len(self.models_)
        n = self.n_train_ if Y is None else int(Y.shape[0])
        K = torch.zeros(X.shape[0], n, dtype=torch.float64, device=self._device)
        if n_workers(self.n_jobs) == 1:
            for j in range(M):
                train = self._train_records[j] if Y is None else self._record_blocks(j, Y, yY[j])
                _add_gram(K, float(self.weights_[j]), self._featurizer(j), X, y_enc[j], train)
            return K
        args = [(self._featurizer(j), float(self.weights_[j]), X, y_enc[j],
                 self._train_records[j] if Y is None else None,
                 Y, None if Y is None else yY[j]) for j in range(M)]
        names = [f"the scores of checkpoint {j}" for j in range(M)]
        for Kj in run_blocks(_checkpoint_gram, args, names, n_jobs=self.n_jobs,
                             verbose=self.verbose, desc="TracIn: scoring"):
            K += Kj.to(K.device)
        return K

    def attribute(self, X, y=None):
        if getattr(self, "scoring_", "features") != "records":
            return super().attribute(X, y)
        X = self._check_X(X)
        y_enc = self._labels(self.models_, X, self._check_y(y))
        return self._record_gram(X, y_enc).cpu().numpy()

    attribute.__doc__ = BaseAttributor.attribute.__doc__

    def self_influence(self):
        if getattr(self, "scoring_", "features") != "records":
            return super().self_influence()
        check_is_fitted(self, "preconditioners_")
        out = torch.zeros(self.n_train_, dtype=torch.float64, device=self._device)
        for j, blocks in enumerate(self._train_records):
            for b0, b1, rb in blocks:
                out[b0:b1] += float(self.weights_[j]) * _grad.self_gram(rb).to(torch.float64)
        return out.cpu().numpy()

    self_influence.__doc__ = BaseAttributor.self_influence.__doc__

    def kernel(self, X, Y=None):
        if getattr(self, "scoring_", "features") != "records":
            return super().kernel(X, Y)
        X = self._check_X(X)
        same = Y is None
        Y = X if same else self._check_X(Y)
        yX = self._labels(self.models_, X, None)
        yY = yX if same else self._labels(self.models_, Y, None)
        K = self._record_gram(X, yX, Y, yY)
        if same:
            K = 0.5 * (K + K.T)
        return K.cpu().numpy()

    kernel.__doc__ = BaseAttributor.kernel.__doc__
