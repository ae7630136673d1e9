"""Representation tracing (Pfahler and Morik, 2021): which training examples built a layer's
representation of a test point.

Under plain SGD a traced layer's weight is ``W_T = W_0 + sum_t sum_{i in B_t} dW_{t,i}`` with
``dW_{t,i} = -(eta_t / B) delta_{t,i} a_{t,i}^T`` (:mod:`skattr.tracing` records the factors
while the network trains).  For a test point ``x``, ``a(x)`` the layer input and ``z_T(x)`` its
output under the final network, the target is ``p(x) = z_T(x) - W_0 * a(x)`` and each
training step and example contributes ``c_{t,i}(x) = dW_{t,i} * a(x)`` (``*`` a product for
Linear layers, a convolution for Conv layers), so that ``sum_t sum_i c_{t,i}(x) = p(x)``.
The influence of example ``i`` is ``sum_t ||c_{t,i}|| cos(c_{t,i}, p) = sum_t c_{t,i}.p / ||p||``,
which is linear in the factors: for a Linear layer
``sum_t (-eta_t / B) (delta_{t,i} . p(x)) (a_{t,i} . a(x)) / ||p(x)||``; no per-step per-test
contribution is ever formed.
"""

from __future__ import annotations

import numbers
import os
import warnings

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._fingerprint import data_hash, template_hash
from .._validation import check_fitted_shape, check_input
from ..model import TorchModel
from ..store import top_k_blocks
from ..tracing import (
    ClasswiseBatches,
    RepresentationRecorder,
    layer_input,
    layer_output,
    layer_weight,
    traceable_layers,
)
from .base import BaseAttributor

__all__ = ["RepresentationTracer"]

_CHUNK = 2**22  # elements of the largest intermediate (rows x test points x positions^2)


class RepresentationTracer(BaseAttributor):
    """Per-layer, per-example decomposition of training (Pfahler and Morik, 2021).

    ``fit(X_train, y_train)`` trains a clone of ``model`` with plain SGD while recording, per
    step and traced layer, the per-example low-rank factors of the update; ``attribute(X)``
    scores every training example by how much its updates built the layer's output for each
    sample of ``X`` (the contributions of all examples and steps sum exactly to
    ``p(x) = z_T(x) - W_0 * a(x)``); ``class_statistics(X)`` gives the norm-weighted cosines per
    class for the ridge plot.

    Parameters
    ----------
    model : TorchModel
        The network and its training settings (``lr``, ``lr_schedule``, ``batch_size``,
        ``epochs``, ``random_state``).  ``momentum`` and ``weight_decay`` must be 0 for
        ``record="factors"`` unless ``momentum_ok=True``.
    layers : str, list of str or None, default=None
        Names of the traced layers (``module.named_modules()``); ``None`` traces every
        Linear, Conv1d and Conv2d layer (groups=1, trainable weight).
    record : {"factors", "updates"}, default="factors"
        ``"factors"``: per-example factors ``(a_i, -eta delta_i / B)`` (or the per-example
        update where smaller, e.g. small convolutions); ``"updates"``: the whole step update
        ``W_{t+1} - W_t`` of any optimizer, shared equally by the examples of the batch.
    projection_dim : int or None, default=None
        Randomly project each side of the factors wider than this (seeded Gaussian, inner
        products unbiased): less storage, approximate scores, no exact weight reconstruction.
    step_every : int, default=1
        Record one step in ``step_every`` (recorded updates scaled by ``step_every``).
    batch_mode : {"examplewise", "classwise"}, default="examplewise"
        ``"examplewise"``: the model's shuffled mini-batches.  ``"classwise"``: the paper's
        mini-batch variant (:class:`~skattr.tracing.ClasswiseBatches`): single-class batches of
        ``batch_size - ghost`` examples plus ``ghost`` examples drawn from the whole training set
        that enter batch-norm statistics but not the loss, so (without batch norm, or with
        ``record="updates"``) each step's update belongs to one class.
    ghost : int, default=0
        Ghost examples per step for ``batch_mode="classwise"`` (less than the model's
        ``batch_size``).  With ``record="updates"`` a step's update is shared by its non-ghost
        examples; with ``"factors"`` a ghost's rows are its own (zero without batch norm: it is
        not in the loss).
    bias : {"append", "exclude"}, default="append"
        ``"append"`` folds a layer's bias in as an input column of ones, so it decomposes
        exactly; ``"exclude"`` leaves it out (``p(x)`` then keeps the bias, reported by
        :meth:`decomposition_residual`).
    store : str, path-like or None, default=None
        Folder for the records on disk (:class:`skattr.store.FeatureStore`, one per layer, in
        ``store/store-<hash of the run>``; ``record="factors"``): memory then holds one block
        of steps at a time, during training and scoring.  Fitting again with the same folder
        after an interruption resumes: the finished blocks are kept (their steps are trained
        through without recording) and the result is the same.
    momentum_ok : bool, default=False
        Trace a run with momentum or weight decay anyway; the part of ``W_T - W_0`` the
        recorded gradient steps miss is in ``weight_residual_``.
    batch_size : int or None, default=None
        Test samples per scoring batch (default the model's ``batch_size_eval``).
    random_state : int, default=0
        Seed of the projections.
    verbose : int, default=0

    Attributes
    ----------
    model_ : TorchModel
        The trained network.
    layers_ : list of str
        The traced layers.
    recorder_ : RepresentationRecorder
        The records (``records_``, ``initial_``, ``projections_``).
    weight_residual_ : dict {layer: float}
        ``||W_T - W_0 - sum_t sum_i dW_{t,i}|| / ||W_T - W_0||`` (bias folded with
        ``bias="append"``); about 1e-15 (float64) for plain SGD, larger with momentum, weight
        decay or ``step_every > 1``; NaN with a projection.
    record_bytes_ : int
        Memory held by the records.
    n_steps_ : int
        Training steps; ``classes_``: the training classes; ``y_train_``: the labels.
    n_train_, n_features_in_, input_shape_, train_fingerprint_

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.representation import RepresentationTracer
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=3, lr=0.1, momentum=0.0, random_state=0)
    >>> tracer = RepresentationTracer(model).fit(X[:300], y[:300])
    >>> tracer.layers_
    ['0', '2']
    >>> tracer.attribute(X[300:305]).shape
    (5, 300)
    >>> tracer.attribute(X[300:305], layer="2").shape
    (5, 300)
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "layers": [str, list, tuple, None],
        "record": [StrOptions({"factors", "updates"})],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "step_every": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_mode": [StrOptions({"examplewise", "classwise"})],
        "ghost": [Interval(numbers.Integral, 0, None, closed="left")],
        "bias": [StrOptions({"append", "exclude"})],
        "store": [str, os.PathLike, None],
        "momentum_ok": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": [Interval(numbers.Integral, 0, None, closed="left")],
        "verbose": ["verbose"],
    }
    _fit_needs_y = True

    def __init__(
        self,
        model,
        *,
        layers=None,
        record="factors",
        projection_dim=None,
        step_every=1,
        batch_mode="examplewise",
        ghost=0,
        bias="append",
        store=None,
        momentum_ok=False,
        batch_size=None,
        random_state=0,
        verbose=0,
    ):
        self.model = model
        self.layers = layers
        self.record = record
        self.projection_dim = projection_dim
        self.step_every = step_every
        self.batch_mode = batch_mode
        self.ghost = ghost
        self.bias = bias
        self.store = store
        self.momentum_ok = momentum_ok
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Train a clone of ``model`` on ``(X, y)`` with plain SGD, recording the updates.

        Parameters
        ----------
        X : array-like or tensor of shape (n_train, ...)
        y : array-like of shape (n_train,)

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = self._check_fit_input(X, y)
        m = self.model
        mom, wd = float(m.momentum or 0.0), float(m.weight_decay or 0.0)
        if self.record == "factors" and (mom != 0.0 or wd != 0.0) and not self.momentum_ok:
            raise ValueError(
                f"RepresentationTracer decomposes training exactly only under plain SGD, but the "
                f"model has momentum={mom} and weight_decay={wd}. Set TorchModel(..., "
                "momentum=0.0, weight_decay=0.0), or pass momentum_ok=True to trace anyway (the "
                "unexplained part of W_T - W_0 is then reported in weight_residual_), or "
                "record='updates' (whole step updates, any optimizer)."
            )
        traceable_layers(m.module, self.layers)  # clear errors before training
        if self.store is not None and self.record != "factors":
            raise ValueError("store= keeps per-example records on disk (record='factors'); "
                             "record='updates' holds one matrix per step, in memory.")
        run = None
        if self.store is not None:
            run = {"method": "RepresentationTracer", "model": template_hash(m), "data": data_hash(X, y),
                   **{k: v for k, v in self.get_params(deep=False).items()
                      if k not in ("model", "store", "batch_size", "verbose")}}
        rec = RepresentationRecorder(
            layers=self.layers, record=self.record, projection_dim=self.projection_dim,
            step_every=self.step_every, bias=self.bias, seed=self.random_state,
            store=None if self.store is None else os.fspath(self.store), store_config=run,
        )
        cbs = [cb for cb in (m.callbacks or []) if not isinstance(cb, (RepresentationRecorder, ClasswiseBatches))]
        if self.batch_mode == "classwise":
            if m.task != "classification":
                raise ValueError("batch_mode='classwise' needs a classification model (task='classification').")
            if not self.ghost < int(m.batch_size):
                raise ValueError(f"ghost={self.ghost} must be less than the model's batch_size={m.batch_size}.")
            cbs.append(ClasswiseBatches(np.asarray(y), int(m.batch_size), int(self.ghost)))
        elif self.ghost:
            raise ValueError(f"ghost={self.ghost} needs batch_mode='classwise'.")
        self.model_ = clone(m).set_params(callbacks=[*cbs, rec])
        self.model_.fit(X, y)
        self.recorder_ = [cb for cb in self.model_.callbacks_ if isinstance(cb, RepresentationRecorder)][-1]
        self.models_ = [self.model_]
        self.layers_ = list(self.recorder_.layers_)
        self.n_train_ = int(X.shape[0])
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        self.train_fingerprint_ = data_hash(X, y)
        self.y_train_ = np.asarray(y)
        self.classes_ = self.model_.class_labels() if self.model_.task == "classification" else None
        self.n_steps_ = int(self.recorder_.n_steps_)
        self.record_bytes_ = int(self.recorder_.nbytes())
        self._rows = {name: None if self.store is not None else self._consolidate(name)
                      for name in self.layers_}
        self.weight_residual_ = {name: self._weight_residual(name) for name in self.layers_}
        if self.record == "factors" and (mom != 0.0 or wd != 0.0):
            worst = max(self.weight_residual_.values())
            warnings.warn(
                f"RepresentationTracer traced a run with momentum={mom}, weight_decay={wd}: "
                f"the recorded updates miss up to {worst:.3g} (relative) of W_T - W_0 "
                "(weight_residual_).", UserWarning, stacklevel=2,
            )
        return self

    def _consolidate(self, name):
        """The records of one layer stacked into rows (one per example and recorded step)."""
        recs = self.recorder_.records_[name]
        if not recs:
            return None
        kind = recs[0].kind
        out = {"kind": kind, "step": [], "index": [], "weight": []}
        if kind == "factors":
            out["U"] = torch.cat([r.U for r in recs])
            out["V"] = torch.cat([r.V for r in recs])
        else:
            out["D"] = torch.cat([r.D for r in recs])
        for j, r in enumerate(recs):
            B = len(r.index)
            if kind == "batch":  # one row per step, shared equally by its examples
                out["row"] = out.get("row", []) + [np.full(B, j)]
                out["weight"].append(np.full(B, 1.0 / B))
            out["step"].append(np.full(B if kind == "batch" else B, r.step))
            out["index"].append(r.index)
        for k in ("step", "index", "weight", "row"):
            if k in out:
                out[k] = np.concatenate(out[k]) if out[k] else np.zeros(0)
        if kind != "batch":
            out["row"] = np.arange(len(out["index"]))
            out["weight"] = np.ones(len(out["index"]))
        out["step_of_row"] = np.asarray([r.step for r in recs]) if kind == "batch" else out["step"]
        return out

    def _exact(self):
        return self.projection_dim is None

    def _weight_residual(self, name):
        if not self._exact():
            return float("nan")
        mod = dict(self.model_.network().named_modules())[name]
        dW = layer_weight(mod, self.bias == "append").to(torch.float64) - self.recorder_.initial_[name].to(torch.float64)
        S = self.total_update(name).to(torch.float64)
        return float((dW - S).norm() / dW.norm().clamp_min(1e-300))

    # ------------------------------------------------------------------ the decomposition
    def _chunks(self, name):
        """The rows of one layer: all of them (in memory), or block by block from the store."""
        if self.store is None:
            if self._rows[name] is None:
                raise ValueError(f"No step was recorded for layer {name!r}.")
            yield self._rows[name]
            return
        W0 = self.recorder_.initial_[name]
        for kind, index, step, T in self.recorder_.stored_chunks(name, W0.device, W0.dtype):
            out = {"kind": kind, "index": index, "step": step, "step_of_row": step,
                   "row": np.arange(len(index)), "weight": np.ones(len(index))}
            if kind == "factors":
                out["U"], out["V"] = T
            else:
                out["D"] = T[0]
            yield out

    def total_update(self, layer):
        """``sum_t sum_i dW_{t,i}`` of one layer as a (d_out, d_in [+1]) tensor (exact records)."""
        check_is_fitted(self, "layers_")
        self._check_layer(layer)
        if not self._exact():
            raise ValueError("total_update needs exact records (projection_dim=None).")
        total = 0
        for rows in self._chunks(layer):
            total = total + (torch.einsum("bld,blk->dk", rows["V"], rows["U"]) if rows["kind"] == "factors"
                             else rows["D"].sum(0))
        return total

    def example_updates(self, layer):
        """``sum_t dW_{t,i}`` per training example, (n_train, d_out, d_in [+1]) (exact records;
        ``record="updates"`` splits each step's update equally over its batch)."""
        check_is_fitted(self, "layers_")
        self._check_layer(layer)
        if not self._exact():
            raise ValueError("example_updates needs exact records (projection_dim=None).")
        W0 = self.recorder_.initial_[layer]
        out = torch.zeros(self.n_train_, *W0.shape, dtype=W0.dtype, device=W0.device)
        for rows in self._chunks(layer):
            idx = torch.as_tensor(rows["index"], dtype=torch.long, device=W0.device)
            if rows["kind"] == "factors":
                per = torch.einsum("bld,blk->bdk", rows["V"], rows["U"])
            else:
                w = torch.as_tensor(rows["weight"], dtype=W0.dtype, device=W0.device)
                per = rows["D"][torch.as_tensor(rows["row"], dtype=torch.long)] * w[:, None, None]
            out.index_add_(0, idx, per)
        return out

    # ------------------------------------------------------------------ test side
    def _check_layer(self, layer):
        if layer is not None and layer not in self.layers_:
            raise ValueError(f"layer {layer!r} is not traced; traced layers: {self.layers_}.")

    def _check_X(self, X):
        check_is_fitted(self, "layers_")
        X = check_input(X)
        check_fitted_shape(X, self.input_shape_, estimator=self._name())
        return X

    def _test_side(self, Xb, names):
        """Per layer: ``a(x)`` (t, L, d_in [+1]), ``p(x)`` (t, L, d_out) under the final network."""
        net = self.model_.network()
        mods = dict(net.named_modules())
        fold = self.bias == "append"
        got = {}
        hooks = [
            mods[n].register_forward_hook(
                lambda mod, inp, out, n=n: got.setdefault(n, []).append((inp[0].detach().clone(), out.detach().clone())))
            for n in names
        ]
        try:
            with torch.no_grad():
                net(Xb)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for n in names:
            mod = mods[n]
            a = torch.cat([layer_input(mod, i, fold) for i, _ in got[n]], dim=1)
            z = torch.cat([layer_output(mod, o) for _, o in got[n]], dim=1)
            W0 = self.recorder_.initial_[n].to(a.dtype)
            out[n] = (a, z - a @ W0.T)
        return out

    def _batches(self, X):
        Xt = self.model_.to_tensor(X)
        bs = int(self.batch_size or self.model_.batch_size_eval)
        for s in range(0, Xt.shape[0], bs):
            yield s, Xt[s:s + bs]

    def _row_products(self, name, rows, a, p, need_norm=False):
        """Per row and test point: ``c . p`` and optionally ``||c||`` (rows, t), chunked."""
        P_out, P_in = self.recorder_.projections_[name]
        pa = a if P_in is None or rows["kind"] != "factors" else a @ P_in
        pp = p if P_out is None or rows["kind"] != "factors" else p @ P_out
        t, Lx = a.shape[0], a.shape[1]
        if rows["kind"] == "factors":
            U, V = rows["U"], rows["V"]
            R, L = U.shape[0], U.shape[1]
            if L == 1 and Lx == 1:
                UA = U[:, 0] @ pa[:, 0].T
                dots = (V[:, 0] @ pp[:, 0].T) * UA
                norms = V[:, 0].norm(dim=1)[:, None] * UA.abs() if need_norm else None
                return dots, norms
            chunk = max(1, _CHUNK // max(1, t * L * Lx * (V.shape[2] if need_norm else 1)))
            dots, norms = [], []
            for r0 in range(0, R, chunk):
                Ur, Vr = U[r0:r0 + chunk], V[r0:r0 + chunk]
                UA = torch.einsum("blk,tmk->btlm", Ur, pa)
                dots.append((torch.einsum("bld,tmd->btlm", Vr, pp) * UA).sum((2, 3)))
                if need_norm:
                    norms.append(torch.einsum("bld,btlm->btdm", Vr, UA).flatten(2).norm(dim=2))
            return torch.cat(dots), (torch.cat(norms) if need_norm else None)
        D = rows["D"]
        G = torch.einsum("tmd,tmk->tdk", pp, pa)
        dots = torch.einsum("bdk,tdk->bt", D, G)
        norms = None
        if need_norm:
            chunk = max(1, _CHUNK // max(1, t * D.shape[1] * Lx))
            norms = torch.cat([torch.einsum("bdk,tmk->btdm", D[r0:r0 + chunk], pa).flatten(2).norm(dim=2)
                               for r0 in range(0, D.shape[0], chunk)])
        return dots, norms

    def _expand(self, rows, vals):
        """Row values (rows, t) -> per (example, step) values (entries, t) and their examples."""
        if rows["kind"] != "batch":
            return vals, rows["index"]
        sel = torch.as_tensor(rows["row"], dtype=torch.long, device=vals.device)
        w = torch.as_tensor(rows["weight"], dtype=vals.dtype, device=vals.device)
        return vals[sel] * w[:, None], rows["index"]

    def _names(self, layer):
        self._check_layer(layer)
        return self.layers_ if layer is None else [layer]

    # ------------------------------------------------------------------ scoring
    def attribute(self, X, y=None, *, layer=None):
        """Influence of every training example on the traced layers' output for each sample.

        ``scores[j, i] = sum_t ||c_{t,i}(x_j)|| cos(c_{t,i}(x_j), p(x_j))``, summed over the
        traced layers (``layer=None``) or for one (``layer=name``).  For each layer the scores
        of all training examples add up to ``||p(x_j)||`` (exact records, bias folded).

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : ignored
            The decomposition does not depend on labels; accepted for the common API.
        layer : str or None, default=None

        Returns
        -------
        scores : ndarray of shape (n_samples, n_train)
        """
        X = self._check_X(X)
        if y is not None and len(np.asarray(y)) != X.shape[0]:
            raise ValueError(f"X and y have inconsistent numbers of samples: {X.shape[0]} and {len(y)}.")
        names = self._names(layer)
        S = np.zeros((X.shape[0], self.n_train_))
        for s, Xb in self._batches(X):
            side = self._test_side(Xb, names)
            for n in names:
                a, p = side[n]
                pn = p.flatten(1).norm(dim=1).to(torch.float64).clamp_min(1e-300)
                Sb = torch.zeros(self.n_train_, Xb.shape[0], dtype=torch.float64, device=a.device)
                for rows in self._chunks(n):
                    dots, _ = self._row_products(n, rows, a, p)
                    vals, idx = self._expand(rows, dots.to(torch.float64) / pn[None, :])
                    Sb.index_add_(0, torch.as_tensor(idx, dtype=torch.long, device=vals.device), vals)
                S[s:s + Xb.shape[0]] += Sb.T.cpu().numpy()
        return S

    def transform(self, X):
        """``attribute(X)``."""
        return self.attribute(X)

    def top_k(self, X, y=None, k=10, *, layer=None):
        """The ``k`` strongest proponents and opponents of each sample, for the traced layers
        summed (``layer=None``) or for one: the paper ranks by one late layer, whose top
        proponents are the most class-consistent (documentation page ``representation.html``).

        Returns
        -------
        TopK
            ``proponents`` / ``opponents``: indices into the training set, (n_samples, k),
            strongest first; ``proponent_scores`` / ``opponent_scores``.
        """
        S = self.attribute(X, y, layer=layer)
        return top_k_blocks([(0, S)], S.shape[0], S.shape[1], k)

    def influence_over_time(self, X, *, layer=None):
        """Per recorded step, the summed influence of its batch on each sample, per layer.

        Returns
        -------
        steps : ndarray of shape (n_steps_recorded,)
            The training steps (0-based).
        influence : dict {layer: ndarray of shape (n_samples, n_steps_recorded)}
            ``sum_{i in B_t} c_{t,i}(x) . p(x) / ||p(x)||``; the cumulative sum over steps ends
            at ``||p(x)||`` (exact records).
        """
        X = self._check_X(X)
        names = self._names(layer)
        steps = np.asarray(self.recorder_.recorded_steps_)
        pos = {s: k for k, s in enumerate(steps)}
        out = {n: np.zeros((X.shape[0], len(steps))) for n in names}
        for s, Xb in self._batches(X):
            side = self._test_side(Xb, names)
            for n in names:
                a, p = side[n]
                pn = p.flatten(1).norm(dim=1).to(torch.float64).clamp_min(1e-300)
                T = torch.zeros(len(steps), Xb.shape[0], dtype=torch.float64, device=a.device)
                for rows in self._chunks(n):
                    dots, _ = self._row_products(n, rows, a, p)
                    col = np.asarray([pos[v] for v in rows["step_of_row"]])
                    T.index_add_(0, torch.as_tensor(col, dtype=torch.long, device=dots.device),
                                 dots.to(torch.float64) / pn[None, :])
                out[n][s:s + Xb.shape[0]] = T.T.cpu().numpy()
        return steps, out

    def class_statistics(self, X):
        """Per layer and sample, the cosines ``cos(c_{t,i}(x), p(x))`` with their weights
        ``||c_{t,i}(x)||`` and the class of each example (for the ridge plot).

        Returns
        -------
        stats : dict {layer: dict}
            ``"cos"``, ``"weight"``: (n_samples, n_entries) over the recorded (step, example)
            pairs; ``"label"``: (n_entries,) the examples' classes; ``"index"``, ``"step"``;
            ``"classes"``: the class labels; ``"influence_by_class"``: (n_samples, n_classes)
            ``sum weight * cos`` per class (the class that built the representation most is
            its argmax).
        """
        X = self._check_X(X)
        out = {}
        classes = np.unique(self.y_train_)
        for n in self.layers_:
            cos_l, w_l = [], []
            for _, Xb in self._batches(X):
                a, p = self._test_side(Xb, [n])[n]
                pn = p.flatten(1).norm(dim=1).to(torch.float64)
                cos_c, w_c, index, step = [], [], [], []
                for rows in self._chunks(n):
                    dots, norms = self._row_products(n, rows, a, p, need_norm=True)
                    dots, idx = self._expand(rows, dots.to(torch.float64))
                    norms, _ = self._expand(rows, norms.to(torch.float64))
                    cos_c.append((dots / (norms * pn[None, :] + 1e-14)).T.cpu().numpy())
                    w_c.append(norms.T.cpu().numpy())
                    index.append(idx)
                    step.append(rows["step"] if rows["kind"] != "batch" else rows["step_of_row"][rows["row"]])
                cos_l.append(np.concatenate(cos_c, axis=1))
                w_l.append(np.concatenate(w_c, axis=1))
            cos, w = np.concatenate(cos_l), np.concatenate(w_l)
            index, step = np.concatenate(index), np.concatenate(step)
            label = self.y_train_[index]
            by_class = np.stack([(cos * w)[:, label == c].sum(1) for c in classes], axis=1)
            out[n] = {"cos": cos, "weight": w, "label": label, "index": index,
                      "step": step, "classes": classes, "influence_by_class": by_class}
        return out

    def decomposition_residual(self, X):
        """Per layer, ``||p(x) - sum_t sum_i c_{t,i}(x)|| / ||p(x)||`` for each sample: the part
        of the layer's output the recorded updates do not explain (0 up to rounding for plain
        SGD with folded biases; an excluded bias, momentum, weight decay or ``step_every > 1``
        leave a residual).  Needs exact records.

        Returns
        -------
        dict {layer: ndarray of shape (n_samples,)}
        """
        X = self._check_X(X)
        if not self._exact():
            raise ValueError(
                f"decomposition_residual needs the exact per-step updates, but this tracer was "
                f"fitted with projection_dim={self.projection_dim}, which keeps only random "
                f"projections of them. Refit with projection_dim=None to check the decomposition.")
        out = {n: [] for n in self.layers_}
        totals = {n: self.total_update(n) for n in self.layers_}
        for _, Xb in self._batches(X):
            side = self._test_side(Xb, self.layers_)
            for n in self.layers_:
                a, p = side[n]
                c = a @ totals[n].to(a.dtype).T
                r = (p - c).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1).clamp_min(1e-300)
                out[n].append(r.to(torch.float64).cpu().numpy())
        return {n: np.concatenate(v) for n, v in out.items()}

    def self_influence(self):
        """Not defined for representation tracing: the score of a training example on itself
        depends on the test point's layer output; use ``attribute(X_train)`` diagonals."""
        raise NotImplementedError(
            "RepresentationTracer has no self-influence; use np.diag(tracer.attribute(X_train)).")

    def kernel(self, X, Y=None):
        """Not defined: representation-tracing scores are not an inner product of features."""
        raise NotImplementedError("RepresentationTracer defines no symmetric kernel.")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags
