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
* With ``store=`` the features live in an on-disk :class:`skattr.store.FeatureStore` and every
  computation is blockwise; an interrupted featurisation resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .. import gradients as _grad
from .._linalg import upper_gram
from .._validation import check_fitted_shape, check_input, check_memory, seed_from_random_state
from ..model import TorchModel
from ..projection import KINDS, Projector
from ..store import BlockLayout, FeatureStore, config_key

__all__ = [
    "TRAK",
    "ModelOutput",
    "MarginOutput",
    "LogitOutput",
    "CallableOutput",
    "make_output",
    "output_values",
]


_PROJECTORS = OrderedDict()  # the last few projectors used (their random factors are cached)


def _progress(iterable, total, verbose, desc):
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def data_hash(*arrays) -> str:
    """A content hash of arrays / tensors (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"None")
            continue
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(a))
        h.update(repr((a.shape, a.dtype.str)).encode())
        if a.dtype == object:
            h.update(repr(a.tolist()).encode())
        else:
            h.update(a.tobytes())
    return h.hexdigest()


# ==========================================================================================
# model-output functions
# ==========================================================================================
class ModelOutput:
    """A TRAK model-output function ``f(z; theta)`` and its reweighting term ``Q``.

    Subclasses implement ``__call__(z, y) -> (n,)`` on the network's outputs ``z`` (n, C) and
    encoded targets ``y``, and ``q(z, y) -> (n,)``, the term ``-d loss / d f`` of the training
    loss with respect to the output (``1 - p`` for the classification margin).  ``network(net)``
    may wrap the network so that ``z`` is something else than its logits (e.g. a probe's logit on
    a hidden layer, see :class:`skattr.estimators.concept.ProbeOutput`); ``prefixes`` then maps the
    model's parameter prefixes to the wrapped module's names.
    """

    def network(self, net):
        return net

    def prefixes(self, prefixes):
        return prefixes

    def __call__(self, z, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def q(self, z, y):
        return torch.ones(z.shape[0], dtype=z.dtype, device=z.device)

    def check(self, model):
        """Raise if the output does not apply to ``model``."""

    def encode_y(self, model, y, n):
        return model.encode_y(np.asarray(y), n)

    def predict_y(self, model, zs):
        """Encoded targets for samples without labels, from the members' outputs ``zs``."""
        z = zs[0]
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    def describe(self):
        """A JSON-able description (keys feature stores)."""
        return {"type": type(self).__name__}

    def __repr__(self):
        return f"{type(self).__name__}()"


def _class_proba(z, idx):
    """Probability of class ``idx`` (n,) under softmax (sigmoid for a single logit)."""
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z[:, 0])
        return torch.where(idx == 1, p1, 1 - p1)
    return torch.softmax(z, dim=1).gather(1, idx[:, None])[:, 0]


def _predict_classes(zs):
    P = None
    for z in zs:
        p = torch.sigmoid(z) if z.shape[1] == 1 else torch.softmax(z, dim=1)
        P = p if P is None else P + p
    if P.shape[1] == 1:
        return (P[:, 0] > 0.5 * len(zs)).long()
    return P.argmax(1)


class MarginOutput(ModelOutput):
    """Classification margin ``log(p_y / (1 - p_y))`` of the label ``y``; ``Q = 1 - p_y``.

    For a single-logit binary model the margin is ``(2 y - 1) z``.  This is
    ``skattr.gradients.OUTPUTS["margin"]``, TRAK's default.
    """

    def __call__(self, z, y):
        return _grad.OUTPUTS["margin"](z, y, None)[:, 0]

    def q(self, z, y):
        return 1.0 - _class_proba(z, y)

    def check(self, model):
        if model.task != "classification":
            raise ValueError(
                "output='margin' needs a classification model; for regression use output='logit' "
                "(an output column, with Q the residual) or a callable."
            )

    def predict_y(self, model, zs):
        return _predict_classes(zs)

    def describe(self):
        return {"type": "margin"}


class LogitOutput(ModelOutput):
    """The logit of a class: of the label ``y`` (``cls=None``) or of a fixed class ``cls``.

    ``Q = -d loss / d f``: for cross-entropy ``1[y = c] - p_c`` (``1 - p_y`` when ``c = y``); for a
    regression model ``f`` is output column ``cls`` (default 0) and ``Q`` the residual ``y - f``.
    """

    def __init__(self, cls=None):
        self.cls = cls

    def check(self, model):
        if model.task == "classification" and self.cls is not None:
            classes = model.class_labels()
            pos = np.flatnonzero(classes == self.cls)
            if len(pos) != 1:
                raise ValueError(
                    f"output={self.cls!r}: not one of the model's classes {classes.tolist()[:20]}."
                )
            self._cls_index = int(pos[0])
        self._task = model.task

    def __call__(self, z, y):
        if getattr(self, "_task", "classification") == "regression":
            return z[:, 0 if self.cls is None else int(self.cls)]
        idx = y if self.cls is None else torch.full_like(y, self._cls_index)
        if z.shape[1] == 1:
            return torch.where(idx == 1, z[:, 0], -z[:, 0])
        return z.gather(1, idx[:, None])[:, 0]

    def q(self, z, y):
        if getattr(self, "_task", "classification") == "regression":
            c = 0 if self.cls is None else int(self.cls)
            return y.reshape(z.shape[0], -1)[:, c] - z[:, c]
        if self.cls is None:
            return 1.0 - _class_proba(z, y)
        idx = torch.full_like(y, self._cls_index)
        return (y == idx).to(z.dtype) - _class_proba(z, idx)

    def predict_y(self, model, zs):
        if getattr(self, "_task", "classification") == "regression":
            return torch.stack(zs).mean(0)
        return _predict_classes(zs)

    def describe(self):
        return {"type": "logit", "cls": None if self.cls is None else repr(self.cls)}

    def __repr__(self):
        return f"LogitOutput(cls={self.cls!r})"


class CallableOutput(ModelOutput):
    """Any callable ``fn(z, y) -> (n,)`` of the network's outputs.

    ``Q`` is 1 unless ``fn`` has a ``q(z, y)`` attribute.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, z, y):
        v = self.fn(z, y)
        if v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if v.ndim != 1:
            raise ValueError(
                f"TRAK needs a scalar output per example; the output callable returned shape "
                f"{tuple(v.shape)}."
            )
        return v

    def q(self, z, y):
        if hasattr(self.fn, "q"):
            return self.fn.q(z, y).reshape(-1)
        return super().q(z, y)

    def describe(self):
        fn = self.fn
        return {"type": "callable", "fn": getattr(fn, "__qualname__", type(fn).__qualname__),
                "module": getattr(fn, "__module__", "")}

    def __repr__(self):
        return f"CallableOutput({self.fn!r})"


def make_output(output):
    """The :class:`ModelOutput` for TRAK's ``output`` parameter.

    ``"margin"`` -> :class:`MarginOutput`; ``"logit"`` -> :class:`LogitOutput` of the label;
    a class label (int) -> :class:`LogitOutput` of that class; a :class:`ModelOutput` -> a copy
    of it; any other callable -> :class:`CallableOutput`.
    """
    if isinstance(output, ModelOutput):
        return copy.deepcopy(output)
    if isinstance(output, str):
        if output == "margin":
            return MarginOutput()
        if output == "logit":
            return LogitOutput()
        raise ValueError(f"output must be 'margin', 'logit', a class label or a callable, got {output!r}.")
    if isinstance(output, (numbers.Integral, np.integer)) and not isinstance(output, bool):
        return LogitOutput(int(output))
    if callable(output):
        return CallableOutput(output)
    raise TypeError(
        f"output must be 'margin', 'logit', a class label or a callable, got {type(output).__name__}."
    )


@torch.no_grad()
def output_values(model, X, y=None, output="margin", batch_size=None):
    """The model-output function ``f`` of ``model`` on ``(X, y)`` as a numpy array (n,).

    ``y=None`` uses the model's own predictions.  Used by the LDS harness
    (:class:`skattr.metrics.SubsetRetrainer`) so that its targets are the very output TRAK
    attributes.
    """
    out = make_output(output)
    model.prepare(X[:1] if not isinstance(X, torch.Tensor) else X[:1])
    out.check(model)
    Xt = model.to_tensor(X)
    net = out.network(model.network())
    bs = int(batch_size or model.batch_size_eval)
    zs = []
    for i in range(0, Xt.shape[0], bs):
        z = net(Xt[i : i + bs])
        zs.append(z[:, None] if z.ndim == 1 else z)
    z = torch.cat(zs)
    yt = out.predict_y(model, [z]) if y is None else out.encode_y(model, y, Xt.shape[0])
    return out(z, yt).detach().cpu().numpy().astype(np.float64)


# ==========================================================================================
# in-memory counterpart of the feature store
# ==========================================================================================
class _MemoryStore(BlockLayout):
    """The :class:`FeatureStore` interface over arrays in memory (one block per model)."""

    def __init__(self, n_rows, dim, n_models, block_size, dtype):
        self.n_rows, self.dim, self.n_models = n_rows, dim, n_models
        self.block_size = block_size
        self.dtype = np.dtype(dtype).name
        self.F = [np.empty((n_rows, dim), dtype=dtype) for _ in range(n_models)]
        self.Q = [np.empty(n_rows, dtype=dtype) for _ in range(n_models)]
        self._done = [set() for _ in range(n_models)]
        self.arrays = {}

    def missing(self, m=None):
        models = range(self.n_models) if m is None else [m]
        return [(mm, b) for mm in models for b in range(self.n_blocks) if b not in self._done[mm]]

    def rows(self, m, b):
        """The arrays that block ``b`` of model ``m`` is featurised into (views)."""
        r0, r1 = self.block_range(b)
        return self.F[m][r0:r1], self.Q[m][r0:r1]

    def write(self, m, b, F, q):
        Fv, qv = self.rows(m, b)
        if not np.may_share_memory(F, Fv):  # rows featurised elsewhere, not in place
            Fv[...] = F
        if not np.may_share_memory(q, qv):
            qv[...] = q
        self._done[m].add(b)

    def iter_blocks(self, m, mmap=True):
        # one block: the whole matrix (it is in memory anyway)
        yield 0, self.n_rows, self.F[m], self.Q[m]

    def q(self, m):
        return self.Q[m]

    def save_array(self, name, a):
        self.arrays[name] = a

    def load_array(self, name, mmap=True):
        return self.arrays.get(name)


# ==========================================================================================
# TRAK
# ==========================================================================================
class TRAK(TransformerMixin, BaseEstimator):
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
        of a 10-model ensemble are the 5-model ensemble.
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
    verbose : int, default=0
        Progress bars when > 0.

    Attributes
    ----------
    models_ : list of TorchModel
        The ensemble.
    subsets_ : ndarray of shape (n_models, n_train) of bool, or None
        Training examples seen by each trained member (None for given models).
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
        "model": [TorchModel],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions(set(KINDS))],
        "n_models": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "models": [list, tuple, None],
        "subset_fraction": [Interval(numbers.Real, 0, 1, closed="right")],
        "output": [StrOptions({"margin", "logit"}), numbers.Integral, callable],
        "ridge": [Interval(numbers.Real, 0, None, closed="left")],
        "store": [str, os.PathLike, None],
        "block_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "method": [StrOptions({"auto", "structured", "vmap"})],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

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
        self.verbose = verbose

    def __sklearn_clone__(self):
        # The network (and a given ensemble) are what is attributed, not sub-estimators to refit:
        # sklearn's clone would drop their trained weights, so they are deep-copied.
        params = self.get_params(deep=False)
        new = {}
        for k, v in params.items():
            if k in ("model", "models"):
                new[k] = copy.deepcopy(v)
            else:
                new[k] = clone(v, safe=False)
        return type(self)(**new)

    # ------------------------------------------------------------------ ensemble
    def _as_member(self, obj, i):
        where = f"models[{i}]"
        if isinstance(obj, TorchModel):
            return copy.deepcopy(obj)
        if isinstance(obj, (str, os.PathLike)):
            try:
                obj = torch.load(obj, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{where}: cannot load the checkpoint file {obj!r}: {exc}") from exc
            if isinstance(obj, TorchModel):
                return copy.deepcopy(obj)
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping):
            obj = obj[1]  # (step, state_dict) as recorded by TrajectoryRecorder
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, Mapping):
            member = copy.deepcopy(self.model)
            net = member.module_ if hasattr(member, "module_") else member.module
            try:
                net.load_state_dict(dict(obj))
            except RuntimeError as exc:
                raise ValueError(
                    f"{where} is a state dict that does not match the model's network: "
                    f"{str(exc).splitlines()[0]} {str(exc).splitlines()[1:3]}"
                ) from exc
            return member
        raise TypeError(
            f"{where} must be a TorchModel, a state dict, a (step, state_dict) checkpoint or a "
            f"path, got {type(obj).__name__}."
        )

    def _check_members(self, members, X):
        ref = members[0]
        ref_net = ref.network()
        ref_shapes = [(n, tuple(p.shape)) for n, p in ref_net.named_parameters()]
        for i, m in enumerate(members[1:], 1):
            what = f"Ensemble member models[{i}] does not match models[0]"
            if m.task != ref.task:
                raise ValueError(f"{what}: task {m.task!r} vs {ref.task!r}.")
            shapes = [(n, tuple(p.shape)) for n, p in m.network().named_parameters()]
            if shapes != ref_shapes:
                da, db = dict(shapes), dict(ref_shapes)
                diff = [k for k in dict.fromkeys(list(da) + list(db)) if da.get(k) != db.get(k)]
                k = diff[0] if diff else "?"
                raise ValueError(
                    f"{what}: parameter {k!r} has shape {da.get(k, 'missing')} vs "
                    f"{db.get(k, 'missing')} (different architectures)."
                )
            if m.prefixes_ != ref.prefixes_ or m.dtype != ref.dtype:
                raise ValueError(f"{what}: params/dtype differ ({m.params!r}, {m.dtype!r}).")
            if ref.task == "classification":
                ca, cb = m.class_labels(), ref.class_labels()
                if len(ca) != len(cb) or np.any(ca != cb):
                    raise ValueError(f"{what}: classes {ca.tolist()[:10]} vs {cb.tolist()[:10]}.")
            if m.n_outputs_ != ref.n_outputs_:
                raise ValueError(f"{what}: {m.n_outputs_} outputs vs {ref.n_outputs_}.")
        for i, m in enumerate(members):
            if hasattr(m, "input_shape_") and tuple(m.input_shape_) != tuple(X.shape[1:]):
                raise ValueError(
                    f"Ensemble member models[{i}] was fitted on inputs of trailing shape "
                    f"{tuple(m.input_shape_)}, but X has trailing shape {tuple(X.shape[1:])}."
                )

    def _member_seed(self, j):
        ss = np.random.SeedSequence(self._seed, spawn_key=(j,))
        return ss

    def _train_members(self, X, y, M):
        if y is None:
            raise ValueError(
                f"n_models={M} trains an ensemble on (X, y): y is required to fit TRAK-{M}."
            )
        n = X.shape[0]
        size = max(1, int(round(float(self.subset_fraction) * n)))
        members, masks = [], np.zeros((M, n), dtype=bool)
        y_arr = np.asarray(y)
        cache = None
        if self.store is not None:
            cache = Path(self.store) / "members"
            cache.mkdir(parents=True, exist_ok=True)
            base_key = {
                "model": template_hash(self.model), "data": self.train_fingerprint_,
                "fraction": float(self.subset_fraction), "seed": self._seed,
            }
        import joblib

        for j in _progress(range(M), M, self.verbose, "TRAK: training ensemble"):
            ss = self._member_seed(j)
            rng = np.random.default_rng(ss)
            idx = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
            masks[j, idx] = True
            mseed = int(ss.generate_state(1)[0] % (2**31 - 1))
            path = None
            if cache is not None:
                path = cache / f"member-{config_key({**base_key, 'j': j})}.joblib"
                if path.exists():
                    try:
                        members.append(joblib.load(path))
                        continue
                    except Exception:  # noqa: BLE001 - damaged cache entry: retrain
                        pass
            member = clone(self.model).set_params(random_state=mseed)
            Xs = X[idx]
            member.fit(Xs, y_arr[idx])
            if path is not None:
                tmp = path.with_name(path.name + ".tmp")
                joblib.dump(member, tmp)
                os.replace(tmp, path)
            members.append(member)
        return members, masks

    def _build_members(self, X, y):
        if self.models is not None:
            if len(self.models) == 0:
                raise ValueError("models is an empty list; pass at least one model or None.")
            M = len(self.models) if self.n_models is None else int(self.n_models)
            if M > len(self.models):
                raise ValueError(f"n_models={M} but only {len(self.models)} models were given.")
            members = [self._as_member(o, i) for i, o in enumerate(self.models[:M])]
            return members, None
        M = 1 if self.n_models is None else int(self.n_models)
        if M == 1:
            return [copy.deepcopy(self.model)], None
        return self._train_members(X, y, M)

    # ------------------------------------------------------------------ features
    def _records(self, member, net, xb, yb, outputs=None):
        return _grad.compute_records(
            net, xb, output=self.output_, y=yb, loss=member.loss_fn,
            prefixes=self.output_.prefixes(member.prefixes_), method=self.method, outputs=outputs,
        )

    def _featurize_rows(self, j, X, y_enc, r0, r1, out=None):
        """Features (rows, dim) and Q (rows,) of rows ``r0:r1`` of X under member ``j``.

        ``out``: optional ``(F, q)`` arrays of those shapes (the in-memory store's rows), written
        in place batch by batch instead of gathered and copied.
        """
        member = self.models_[j]
        net = self.output_.network(member.network())
        bs = int(self.batch_size or member.batch_size_eval)
        rows, k = r1 - r0, self.feature_dim_
        if out is None:
            out = (np.empty((rows, k), dtype=member.dtype), np.empty(rows, dtype=member.dtype))
        F_out, q_out = out
        # on the CPU the projection accumulates straight into the output rows
        Ft = torch.from_numpy(F_out) if member.device_.type == "cpu" else None
        proj = None if self.projection_dim is None else self._projector(member, j)
        scale = 1.0 / math.sqrt(k)
        Xt = member.to_tensor(X[r0:r1])  # validated and converted once
        for i0 in range(r0, r1, bs):
            i1 = min(r1, i0 + bs)
            xb = Xt[i0 - r0 : i1 - r0]
            yb = None if y_enc is None else y_enc[i0:i1]
            outs = {}
            recs = self._records(member, net, xb, yb, outputs=outs)
            if proj is None:
                F_out[i0 - r0 : i1 - r0] = _grad.flatten(recs)[:, 0].detach().cpu().numpy()
            else:
                o = Ft[i0 - r0 : i1 - r0] if Ft is not None else torch.empty(
                    i1 - i0, k, dtype=proj.dtype, device=proj.device)
                o.zero_()
                _grad.project(recs, proj, out=o[:, None, :])
                o.mul_(scale)
                if Ft is None:
                    F_out[i0 - r0 : i1 - r0] = o.cpu().numpy()
            with torch.no_grad():
                z = outs["logits"]  # from the gradients' own forward pass
                q = self.output_.q(z, yb if yb is not None else torch.zeros(len(xb), dtype=torch.long, device=z.device))
            q_out[i0 - r0 : i1 - r0] = q.detach().cpu().numpy()
        return F_out, q_out

    def _projection_seed(self, j):
        """Seed of member ``j``'s projection: independent across members, so that projection
        noise averages out over the ensemble instead of being shared by every member (member 0
        uses ``random_state`` itself)."""
        if j == 0:
            return self._seed
        return int(np.random.SeedSequence(self._seed, spawn_key=(j, 1)).generate_state(1, np.uint64)[0] >> 1)

    def _projector(self, member, j):
        shapes = tuple((n, tuple(p.shape)) for n, p in member.network().named_parameters())
        seed = self._projection_seed(j)
        key = (self.projection, self.feature_dim_, seed, str(member.device_),
               str(member.torch_dtype_), type(self.output_).__name__, shapes)
        if key not in self._projectors:
            # projections are deterministic in their key: share them across fits (grid searches,
            # ensembles, refits) instead of drawing the same factors again; this estimator keeps
            # only the current member's (dense rows can be large)
            self._projectors.clear()
            proj = _PROJECTORS.get(key)
            if proj is None:
                proj = Projector(self.projection, self.feature_dim_, seed,
                                 device=member.device_, dtype=member.torch_dtype_)
                _PROJECTORS[key] = proj
                while len(_PROJECTORS) > 2:
                    _PROJECTORS.popitem(last=False)
            self._projectors[key] = proj
        return self._projectors[key]

    def _exact_dim(self, member, X, y_enc):
        net = self.output_.network(member.network())
        xb = member.to_tensor(X[:1])
        yb = None if y_enc is None else y_enc[:1]
        return int(sum(r.n_params for r in self._records(member, net, xb, yb)))

    def _labels(self, members, X, y):
        """Encoded targets per member for (X, y); y=None: the ensemble's own predictions."""
        n = X.shape[0]
        if y is not None:
            return [self.output_.encode_y(m, y, n) for m in members]
        zs = []
        for m in members:
            net = self.output_.network(m.network())
            Xt = m.to_tensor(X)
            bs = int(self.batch_size or m.batch_size_eval)
            with torch.no_grad():
                parts = []
                for i in range(0, n, bs):
                    z = net(Xt[i : i + bs])
                    parts.append(z[:, None] if z.ndim == 1 else z)
            zs.append(torch.cat(parts))
        yt = self.output_.predict_y(members[0], zs)
        return [yt.to(m.device_) for m in members]

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Featurise the training set ``(X, y)`` with every model of the ensemble.

        Parameters
        ----------
        X : array-like or tensor of shape (n_train, ...)
        y : array-like of shape (n_train,), default=None
            Training labels (targets of the output function; concept labels for a probe
            output).  Required to train an ensemble; otherwise defaults to the model's
            predictions.

        Returns
        -------
        self
        """
        self._validate_params()
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
        self._seed = seed_from_random_state(self.random_state)
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        self.n_train_ = n
        self.train_fingerprint_ = data_hash(X, y)
        self.output_ = make_output(self.output)

        members, masks = self._build_members(X, y)
        for m in members:
            m.prepare(X[:1])
        self._check_members(members, X)
        self.output_.check(members[0])
        if len(members) > 1 and getattr(self.output_, "single_model", False):
            raise ValueError(
                f"{type(self.output_).__name__} is tied to the network it was built on; use a "
                "single model (n_models=1) with it."
            )
        self.models_, self.subsets_ = members, masks
        y_enc = self._labels(members, X, y)

        dtype = np.dtype(members[0].dtype)
        self._projectors = {}
        if self.projection_dim is None:
            self.feature_dim_ = self._exact_dim(members[0], X, y_enc[0])
        else:
            self.feature_dim_ = int(self.projection_dim)
        k, M = self.feature_dim_, len(members)
        bsz = int(self.block_size)
        if self.store is None:
            check_memory(
                M * n * k * dtype.itemsize,
                f"TRAK features for {M} model(s) x {n} examples x {k} dimensions",
                hint="Use store='some/dir' for an on-disk feature store, or a smaller projection_dim.",
            )
            store = _MemoryStore(n, k, M, bsz, dtype)
        else:
            config = {
                "members": [m.fingerprint() for m in members],
                "output": self.output_.describe(),
                "projection": self.projection if self.projection_dim is not None else "exact",
                "k": k, "seed": self._seed, "member_seeds": "independent", "method": self.method,
                "data": self.train_fingerprint_,
            }
            store = FeatureStore.for_config(
                self.store, config, n_rows=n, dim=k, n_models=M, block_size=bsz, dtype=dtype.name,
            )
        todo = store.missing()
        desc = f"TRAK: featurising {len(todo)} block(s)"
        for m, b in _progress(todo, len(todo), self.verbose, desc):
            r0, r1 = store.block_range(b)
            F, q = self._featurize_rows(m, X, y_enc[m], r0, r1, out=store.rows(m, b))
            store.write(m, b, F, q)
        self.store_ = store if self.store is not None else None
        self._features = store
        self._finalize()
        return self

    # ------------------------------------------------------------------ linear algebra
    # Everything below runs in torch (float64) on the model's device, block by block.
    @property
    def _device(self):
        return self.models_[0].device_

    def _block(self, F, dtype=torch.float64):
        """A feature block as a tensor on the device (memory maps are read into memory once)."""
        if isinstance(F, np.memmap) or not F.flags.writeable:
            F = np.array(F)
        return torch.from_numpy(F).to(device=self._device, dtype=dtype)

    def _gram(self, m):
        """Member ``m``'s system matrix ``Phi^T Phi`` (primal) or ``Phi Phi^T`` (dual).

        Only its lower triangle is filled (all the Cholesky factorisation reads): the matrix is
        the transpose of row panels of the upper triangle, so no half is mirrored.  It is in the
        products' precision when the features are one block (in memory), in float64 when
        blocks are summed.
        """
        st, n, k = self._features, self.n_train_, self.feature_dim_
        name = f"m{m:03d}_gram_{self.solver_}_upper"
        shape = (k, k) if self.solver_ == "primal" else (n, n)
        U = st.load_array(name, mmap=False)  # stored as its upper triangle
        if U is not None and U.shape == shape:
            return torch.from_numpy(np.array(U)).to(self._device).T
        wide = self._product_dtype()
        blocks = list(st.iter_blocks(m))
        acc = wide if len(blocks) == 1 else torch.float64
        if self.solver_ == "primal":
            U = None
            for _, _, F, _ in blocks:
                Ub = upper_gram(self._block(F, wide).T, acc)  # Phi_b^T Phi_b
                U = Ub if U is None else U.add_(Ub)
        else:
            check_memory(n * n * torch.finfo(acc).bits // 8, f"The {n} x {n} dual Gram matrix")
            U = torch.empty(n, n, dtype=acc, device=self._device)
            for i, (r0, r1, F, _) in enumerate(blocks):
                Fa = self._block(F, wide)
                U[r0:r1, r0:r1] = upper_gram(Fa, acc)
                for s0, s1, F2, _ in blocks[i + 1 :]:
                    U[r0:r1, s0:s1] = Fa @ self._block(F2, wide).T
        if self.store_ is not None:  # persisted without the unspecified triangle
            st.save_array(name, U.triu_().cpu().numpy())
        return U.T

    def _product_dtype(self):
        # products of features in their own precision (float64 for ridge=0, where the rank
        # decides), accumulated and solved in float64
        if self._features.dtype == "float64" or float(self.ridge) == 0.0:
            return torch.float64
        return torch.float32

    def _finalize(self):
        n, k, M = self.n_train_, self.feature_dim_, len(self.models_)
        self.solver_ = "primal" if k <= n else "dual"
        wide = self._product_dtype()
        factors, lambdas, Q = [], [], []
        for m in range(M):
            G = self._gram(m)
            mean_sq = float(torch.diagonal(G).sum(dtype=torch.float64)) / n
            if not np.isfinite(mean_sq):
                raise FloatingPointError(f"Model {m}: the TRAK features contain NaN or infinity.")
            lam = float(self.ridge) * mean_sq
            G.diagonal().add_(lam)
            # float32 factorisation only where the system is well conditioned: its condition
            # number is at most 1 + trace / lambda = 1 + n / ridge
            fast = wide == torch.float32 and 1.0 + n / max(float(self.ridge), 1e-300) <= _F32_MAX_COND
            L = self._cholesky(G, m, lam, torch.float32 if fast else torch.float64)
            del G
            factors.append(L.cpu().numpy())  # in the precision it was factorised in
            lambdas.append(lam)
            Q.append(np.asarray(self._features.q(m), dtype=np.float64))
        self.cholesky_ = factors
        self.lambdas_ = np.asarray(lambdas)
        self.q_models_ = np.stack(Q)
        self.q_ = self.q_models_.mean(0)

    def _cholesky(self, A, m, lam, dtype=torch.float64):
        """Lower Cholesky factor of the system ``A`` (its lower triangle is read), with clear
        errors when singular.

        ``dtype=float32`` (float32 features, ridge > 0, condition number at most
        ``_F32_MAX_COND``) factorises in float32: ``A`` holds sums of float32 products, so it
        is only accurate to float32 rounding, and a float32 factorisation's backward error is of
        that same order (twice as fast); a float32 factorisation that breaks down is redone in
        float64 (and kept in float64).
        """
        if dtype != torch.float64 and lam > 0:
            L, info = torch.linalg.cholesky_ex(A.to(dtype))
            if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
                return L
        A = A.to(torch.float64)
        dim = A.shape[0]
        what = "Phi^T Phi (k x k)" if self.solver_ == "primal" else "Phi Phi^T (n x n)"
        hint = "set ridge > 0 (e.g. the default ridge=1.0)" + (
            ", or use a projection_dim below n_train" if self.solver_ == "primal" else ""
        )
        scale = float(torch.diagonal(A).abs().max()) if dim else 0.0
        if scale == 0.0:
            raise ValueError(
                f"Model {m}: every TRAK feature is zero (the output does not depend on the "
                "selected parameters); nothing to attribute."
            )
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise ValueError(
                f"Model {m}: the feature matrix {what} is singular (ridge={self.ridge}); {hint}."
            )
        piv = torch.diagonal(L) ** 2
        tol = dim * np.finfo(np.float64).eps * 10
        if lam == 0.0 and float(piv.min()) <= tol * scale:
            rank = int((piv > tol * scale).sum())
            raise ValueError(
                f"Model {m}: with ridge=0 the feature matrix {what} is singular (numerical rank "
                f"about {rank} of {dim}); {hint}."
            )
        return L

    # ------------------------------------------------------------------ scoring
    def _check_X(self, X):
        check_is_fitted(self, "lambdas_")
        X = check_input(X)
        if X.ndim == 2 and len(self.input_shape_) == 1 and X.shape[1] != self.input_shape_[0]:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.input_shape_[0]} features as input (the training set's)."
            )
        check_fitted_shape(X, self.input_shape_)
        return X

    def attribute(self, X, y=None):
        """TRAK scores of every training example for each sample of ``X``.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            Labels defining the output on each sample (the margin of class ``y``); ``None``
            uses the ensemble's predictions.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_train)
            ``scores[j, i]``: the estimated effect of training example ``i`` on the output for
            ``X[j]`` (positive: it raises it).
        """
        X = self._check_X(X)
        if y is not None:
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        y_enc = self._labels(self.models_, X, y)
        t, n, M = X.shape[0], self.n_train_, len(self.models_)
        dev = self._device
        st = self._features
        wide = self._product_dtype()
        S = torch.empty(t, n, dtype=torch.float64, device=dev)
        if self.solver_ == "primal":
            # products land in one reused buffer of column chunks and are accumulated into S
            # (float64): no zero-filled or converted (t, n) temporaries
            chunk = min(n, _SCORE_CHUNK)
            buf = torch.empty(t * chunk, dtype=wide, device=dev)
        for m in _progress(range(M), M, self.verbose, "TRAK: scoring"):
            G, _ = self._featurize_rows(m, X, y_enc[m], 0, t)
            G = self._block(G, wide)  # (t, k)
            L = torch.from_numpy(self.cholesky_[m]).to(dev)
            if self.solver_ == "primal":
                T = _solve_right(G.to(L.dtype), L).to(wide)  # (t, k)
                for r0, r1, F, _ in st.iter_blocks(m):
                    Fb = self._block(F, wide)
                    for c0 in range(r0, r1, chunk):
                        c1 = min(r1, c0 + chunk)
                        out = buf[: t * (c1 - c0)].view(t, c1 - c0)
                        torch.mm(T, Fb[c0 - r0 : c1 - r0].T, out=out)
                        _accumulate(S[:, c0:c1], out, m == 0)
            else:
                B = torch.empty(t, n, dtype=wide, device=dev)
                for r0, r1, F, _ in st.iter_blocks(m):
                    B[:, r0:r1] = G @ self._block(F, wide).T
                _accumulate(S, _solve_right(B.to(L.dtype), L), m == 0)
        S *= torch.from_numpy(self.q_ / M).to(dev)[None, :]
        return S.cpu().numpy()

    def transform(self, X):
        """Attribute the ensemble's own predictions on ``X``: ``attribute(X, y=None)``."""
        return self.attribute(X, None)

    def self_influence(self):
        """``tau(z_i, z_i)`` for every training example, (n_train,).

        Large values flag examples the models fit only through themselves (e.g. mislabelled
        ones); see :func:`skattr.metrics.mislabel_detection_auc`.
        """
        check_is_fitted(self, "lambdas_")
        n, M, dev = self.n_train_, len(self.models_), self._device
        out = torch.zeros(n, dtype=torch.float64, device=dev)
        st = self._features
        for m in range(M):
            if self.solver_ == "primal":
                # phi_i^T (L L^T)^-1 phi_i = |L^-1 phi_i|^2
                L = torch.from_numpy(self.cholesky_[m]).to(dev)
                for r0, r1, F, _ in st.iter_blocks(m):
                    W = torch.linalg.solve_triangular(L.T, self._block(F, L.dtype), upper=True, left=False)
                    out[r0:r1] += (W * W).sum(1, dtype=torch.float64)
            else:
                # phi_i^T (Phi^T Phi + l I)^-1 phi_i = 1 - l [(Phi Phi^T + l I)^-1]_ii
                L = torch.from_numpy(self.cholesky_[m]).to(dev, torch.float64)
                Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=dev), upper=False)
                out += 1.0 - self.lambdas_[m] * (Linv**2).sum(0)
        return (out / M).cpu().numpy() * self.q_

    def __setstate__(self, state):
        if "factors_" in state and "cholesky_" not in state:  # pickled when the factors were factors_
            state["cholesky_"] = state.pop("factors_")
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        tags.non_deterministic = False
        return tags


_SCORE_CHUNK = 1024  # training examples per scoring product
_F32_MAX_COND = 1e5  # largest condition-number bound factorised in float32 (error ~ cond * 6e-8)


def _solve_right(B, L):
    """``B (L L^T)^-1`` for a lower Cholesky factor ``L``: two triangular solves from the right,
    in B's (rows, dim) layout."""
    B = torch.linalg.solve_triangular(L.T, B, upper=True, left=False)
    return torch.linalg.solve_triangular(L, B, upper=False, left=False)


def _accumulate(dst, src, first):
    """``dst = src`` (first model) or ``dst += src``, converting to dst's dtype on the fly."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


def template_hash(model):
    """A hash of a TorchModel's training settings and architecture (not of its random init).

    ``fit`` re-initialises the module from ``random_state`` (unless ``warm_start``), so two
    templates that differ only in their initial weights train identical models.
    """
    import joblib

    params = model.get_params(deep=False)
    module = params.pop("module")
    params.pop("verbose", None)
    desc = {"params": joblib.hash(params), "module": repr(module),
            "shapes": [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]}
    if model.warm_start:
        desc["weights"] = joblib.hash({k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    return config_key(desc)


warnings.filterwarnings("ignore", message=".*weights_only.*", category=FutureWarning)
