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

from ..ensemble import load_member
from ..training import TrajectoryRecorder
from .base import BaseAttributor

__all__ = ["TracIn"]


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
