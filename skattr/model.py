"""TorchModel: the one wrapper around ``torch.nn.Module`` that every skattr estimator uses."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import threading
import warnings
import weakref

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import ClassifierTags, RegressorTags
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from . import _memory
from . import gradients as _grad
from ._validation import check_fitted_shape, check_input, seed_from_random_state
from .featurize import featurize_batches
from .hessian import record_chunks
from .outputs import task_loss
from .projection import Projector
from .training import copy_callbacks, train_module

__all__ = ["TorchModel"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchModel(BaseEstimator):
    """A PyTorch network as a scikit-learn estimator.

    Wrap a trained ``nn.Module`` to use it as is, or call :meth:`fit` to train a fresh copy of the
    module (re-initialised from ``random_state``) with seeded mini-batch SGD.  Every skattr method
    takes a ``TorchModel``.

    Parameters
    ----------
    module : torch.nn.Module
        The network, mapping a batch ``(n, ...)`` to logits ``(n, C)`` (classification; a single
        logit means binary with a sigmoid) or outputs ``(n, m)`` (regression).  Lazy modules
        (``nn.LazyLinear``) are materialised on the first input.
    task : {"classification", "regression"}, default="classification"
    params : str or list of str, default=None
        Which parameters count for gradients and kernels, by name prefix (as in
        ``module.named_parameters()``). ``None`` means every trainable parameter.
    epochs, batch_size, lr, momentum, weight_decay : training settings for :meth:`fit`.
    lr_schedule : {None, "linear", "cosine"} or callable ``(step, total) -> lr``, default=None
    callbacks : list of :class:`skattr.training.Callback`, default=None
        Copied at ``fit``; the fitted copies are in ``callbacks_`` (e.g. a
        :class:`~skattr.training.TrajectoryRecorder` with checkpoints and batch order).
    warm_start : bool, default=False
        If True, :meth:`fit` continues from the module's current weights instead of
        re-initialising them.
    device : {"auto", "cpu", "cuda", ...}, default="auto"
        "auto" uses CUDA when available.
    dtype : {"float32", "float64"}, default="float32"
    batch_size_eval : int, default=512
        Batch size for inference, gradients and kernels.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation and the batch order of :meth:`fit`.
    verbose : int, default=0

    Attributes
    ----------
    module_ : torch.nn.Module
        The trained copy (after :meth:`fit`).
    classes_ : ndarray
        Class labels (classification).
    history_ : list of float
        Mean training loss per epoch.
    callbacks_ : list
    n_features_in_ : int
    input_shape_ : tuple

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0).fit(X, y)
    >>> model.score(X, y) > 0.8
    True
    >>> model.predict_proba(X[:2]).shape
    (2, 10)
    """

    def __init__(
        self,
        module,
        *,
        task="classification",
        params=None,
        epochs=10,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        lr_schedule=None,
        callbacks=None,
        warm_start=False,
        device="auto",
        dtype="float32",
        batch_size_eval=512,
        random_state=None,
        verbose=0,
    ):
        self.module = module
        self.task = task
        self.params = params
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.callbacks = callbacks
        self.warm_start = warm_start
        self.device = device
        self.dtype = dtype
        self.batch_size_eval = batch_size_eval
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ validation / setup
    def _check_params(self):
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(
                f"module must be a torch.nn.Module, got {type(self.module).__name__}."
            )
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}.")
        for name in ("epochs", "batch_size", "batch_size_eval"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < (0 if name == "epochs" else 1):
                kind = "a non-negative" if name == "epochs" else "a positive"
                raise ValueError(f"{name} must be {kind} integer, got {v!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}.")

    @property
    def device_(self):
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype_(self):
        return _DTYPES[self.dtype]

    @property
    def prefixes_(self):
        return [self.params] if isinstance(self.params, str) else self.params

    def __sklearn_is_fitted__(self):
        # A wrapped module is usable as is; lazy modules need a first input.
        return hasattr(self, "module_") or not _has_lazy(self.module)

    # ------------------------------------------------------------------ public interface
    # What skattr's methods need of the network; nothing outside this module touches the
    # wrapper's private state.
    def network(self):
        """The ``nn.Module`` to evaluate, in eval mode on the model's device and dtype.

        The fitted copy ``module_`` after :meth:`fit`, else the wrapped ``module``.
        """
        net = self.module_ if hasattr(self, "module_") else self.module
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(net).__name__}.")
        p = next(iter(net.parameters()), None)
        if p is not None and not _has_lazy(net):
            if p.device != self.device_ or p.dtype != self.torch_dtype_:
                net.to(device=self.device_, dtype=self.torch_dtype_)
        return net.eval()

    def _check_trainable(self, net):
        sel = _grad._selected(net, self.prefixes_)
        if not sel:
            names = [n for n, _ in net.named_parameters()]
            if not any(p.requires_grad for p in net.parameters()):
                raise ValueError(
                    f"The module {type(net).__name__} has no trainable parameters "
                    "(no parameter with requires_grad=True): there is no gradient to compute."
                )
            raise ValueError(
                f"params={self.params!r} selects no trainable parameter; the module's "
                f"parameters are {names[:10]}{' ...' if len(names) > 10 else ''}."
            )
        return sel

    def to_tensor(self, X, name="X"):
        """Validate ``X`` and convert it to a tensor on the model's device.

        Floating inputs get the model's dtype.  Integer and boolean inputs (token ids) keep
        their dtype when the network has an ``nn.Embedding`` / ``nn.EmbeddingBag`` (they are
        then indices); otherwise they are features and get the model's dtype too.

        When the network passes its input straight to an ``nn.Embedding`` /
        ``nn.EmbeddingBag`` (its first layer, as in ``Sequential(Embedding(...), ...)`` or a
        ``forward`` that starts with ``self.emb(x)``), ``X`` must hold token ids: floating
        values that are whole numbers (token ids as scikit-learn's ``check_array`` or pandas
        return them, float64) are converted to int64, other floating values raise a
        ``ValueError``, as does an id outside ``0 .. num_embeddings - 1`` (naming it and its
        place).  Integer types torch does not index with (uint8, int16, bool) become int64.
        """
        X = self._check_X(X, name)
        if hasattr(self, "input_shape_"):
            check_fitted_shape(X, self.input_shape_, name=name, estimator=type(self).__name__)
        return self._as_tensor(X)

    def _keeps_dtype(self, X):
        """Whether ``X`` holds indices to keep as they are (integer or bool, network with an
        embedding)."""
        if isinstance(X, torch.Tensor):
            index = not (X.is_floating_point() or X.is_complex())
        else:
            index = np.asarray(X).dtype.kind in "iub" if hasattr(X, "__array__") or isinstance(
                X, (list, tuple)) else False
        if not index:
            return False
        net = self.module_ if hasattr(self, "module_") else self.module
        return isinstance(net, torch.nn.Module) and any(
            isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) for m in net.modules()
        )

    def _check_X(self, X, name="X"):
        if self._keeps_dtype(X):  # validated without the cast to floating point
            if not isinstance(X, torch.Tensor):
                X = np.asarray(X)
            X = check_input(X, name=name, dtype=X.dtype)
        else:
            X = check_input(X, name=name)
        emb = self._input_embedding(X)
        return X if emb is None else _token_ids(X, *emb, name=name)

    def _input_embedding(self, X):
        """``(name, module)`` of the ``nn.Embedding`` / ``nn.EmbeddingBag`` the network hands
        its input to unchanged, or None: learnt once per network, input kind and trailing shape
        from one example (see :func:`_embedding_taking_input`)."""
        net = self.module_ if hasattr(self, "module_") else self.module
        if not isinstance(net, torch.nn.Module):
            return None
        floating = X.is_floating_point() if isinstance(X, torch.Tensor) else X.dtype.kind in "fc"
        cache = _INPUT_EMBEDDING.setdefault(net, {})
        key = (floating, tuple(X.shape[1:]))
        if key not in cache:
            cache[key] = _embedding_taking_input(net, X[:1], self.torch_dtype_)
        name = cache[key]
        if name is None:
            return None
        mod = dict(net.named_modules()).get(name)
        return None if mod is None else (name, mod)

    def _as_tensor(self, X):
        dtype = None if self._keeps_dtype(X) else self.torch_dtype_
        if isinstance(X, torch.Tensor):
            return X.to(device=self.device_, dtype=dtype)
        X = np.ascontiguousarray(X)
        if any(st < 0 for st in X.strides):  # e.g. a one-row reversed slice counts as contiguous
            X = X.copy()
        if not X.flags.writeable:  # torch refuses read-only memory
            X = X.copy()
        return torch.as_tensor(X, dtype=dtype, device=self.device_)

    def _materialise(self, net, X):
        # Lazy parameters are created in the model's dtype/device and initialised from
        # ``random_state``, so an unfitted lazy module materialises to the same weights every time.
        if _has_lazy(net):
            net.to(device=self.device_, dtype=self.torch_dtype_)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_from_random_state(self.random_state))
                dtype = self.torch_dtype_ if X.is_floating_point() else None  # ids stay ids
                net.eval()(X[:1].to(device=self.device_, dtype=dtype))

    def encode_y(self, y, n):
        """Targets as the tensor the loss takes: class indices (long) or float outputs (n, m).

        Raises a ``ValueError`` naming the labels that are not among the model's classes.
        """
        y = np.asarray(y)
        if y.shape[0] != n:
            raise ValueError(f"X and y have inconsistent numbers of samples: {n} and {y.shape[0]}.")
        if self.task == "regression":
            y = y.astype(np.float64)
            if not np.all(np.isfinite(y)):
                raise ValueError("Input y contains NaN or infinity.")
            return torch.as_tensor(y.reshape(n, -1), dtype=self.torch_dtype_, device=self.device_)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-dimensional for classification, got shape {y.shape}.")
        classes = self.classes_ if hasattr(self, "classes_") else None
        if classes is None:
            classes = np.arange(self.n_outputs_ if self.n_outputs_ > 1 else 2)
        idx = np.searchsorted(classes, y)
        idx = np.clip(idx, 0, len(classes) - 1)
        bad = classes[idx] != y
        if np.any(bad):
            raise ValueError(
                f"y contains labels {np.unique(y[bad])[:5].tolist()} that are not among the "
                f"model's classes {classes.tolist()[:20]}."
            )
        return torch.as_tensor(idx, dtype=torch.long, device=self.device_)

    # ------------------------------------------------------------------ losses
    def loss_fn(self, z, y):
        """Per-example training loss (n,) of outputs ``z`` (n, C) against encoded targets ``y``
        (cross-entropy, binary cross-entropy for one logit, half squared error for regression)."""
        return task_loss(self.task, z, y)

    @property
    def n_outputs_(self):
        if hasattr(self, "_n_outputs"):
            return self._n_outputs
        raise AttributeError("n_outputs_ is known after the first forward pass.")

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Train a fresh copy of ``module`` on ``(X, y)``.

        The copy is re-initialised (``reset_parameters`` of every submodule) from
        ``random_state`` unless ``warm_start=True``; batch order is seeded too, so the same
        ``random_state`` gives the same trained network.
        """
        self._check_params()
        X = self._check_X(X)
        Xt = self._as_tensor(X)
        seed = seed_from_random_state(self.random_state)
        src = self.module_ if (self.warm_start and hasattr(self, "module_")) else self.module
        net = copy.deepcopy(src)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if not _has_lazy(net):
                net.to(device=self.device_, dtype=self.torch_dtype_)
            with _input_context(net, X):
                self._materialise(net, Xt)
            net.to(device=self.device_, dtype=self.torch_dtype_)
            if not self.warm_start:
                for m in net.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        self._check_trainable(net)
        with torch.no_grad(), _input_context(net, X):
            z = net.eval()(Xt[: min(2, len(Xt))])
        self._n_outputs = 1 if z.ndim == 1 else int(z.shape[-1])
        if self.task == "classification":
            y = column_or_1d(y, warn=True)
            check_classification_targets(y)
            self.classes_ = np.unique(y)
            need = len(self.classes_) if self._n_outputs > 1 else 2
            if self._n_outputs > 1 and self._n_outputs < len(self.classes_) or (
                self._n_outputs == 1 and len(self.classes_) > 2
            ):
                raise ValueError(
                    f"y has {len(self.classes_)} classes but the module outputs "
                    f"{self._n_outputs} logit(s) (needs {need})."
                )
            if self._n_outputs > 1 and len(self.classes_) < self._n_outputs:
                # labels are indices into the logits
                self.classes_ = np.arange(self._n_outputs)
        yt = self.encode_y(y, Xt.shape[0])
        self.callbacks_ = copy_callbacks(self.callbacks)
        self.history_ = train_module(
            net,
            Xt,
            yt,
            self.loss_fn,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            lr=float(self.lr),
            momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
            lr_schedule=self.lr_schedule,
            seed=seed,
            callbacks=self.callbacks_,
            verbose=self.verbose,
        )
        self.module_ = net.eval()
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        return self

    # ------------------------------------------------------------------ inference
    def _batches(self, Xt, batch_size=None):
        bs = int(batch_size or self.batch_size_eval)
        for i in range(0, Xt.shape[0], bs):
            yield i, Xt[i : i + bs]

    def prepare(self, X):
        """``(network, tensor)`` for inference: ``X`` validated and converted, lazy modules
        materialised, the number of outputs known."""
        Xt = self.to_tensor(X)
        net = self.network()
        if _has_lazy(net):
            self._materialise(net, Xt)
            net = self.network()
        self._check_trainable(net)
        if not hasattr(self, "_n_outputs"):
            with torch.no_grad():
                z = net(Xt[:1])
            self._n_outputs = 1 if z.ndim == 1 else int(z.shape[-1])
        return net, Xt

    @torch.no_grad()
    def logits(self, X):
        """Raw network outputs as a tensor (n, C) on the model's device."""
        net, Xt = self.prepare(X)
        out = []
        for _, xb in self._batches(Xt):
            z = net(xb)
            out.append(z[:, None] if z.ndim == 1 else z)
        return torch.cat(out)

    def decision_function(self, X):
        """Logits as a numpy array, (n, C) (or (n,) for a single-logit binary model)."""
        z = self.logits(X).cpu().numpy()
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X):
        """Class probabilities (n, n_classes): softmax of the logits (sigmoid for one logit)."""
        if self.task != "classification":
            raise AttributeError("predict_proba is only available for task='classification'.")
        z = self.logits(X)
        if z.shape[1] == 1:
            p = torch.sigmoid(z[:, 0])
            return torch.stack([1 - p, p], 1).cpu().numpy()
        return torch.softmax(z, dim=1).cpu().numpy()

    def class_labels(self):
        """The class labels, in the order of the network's outputs (``classes_`` after
        :meth:`fit`, else ``0 .. C-1``)."""
        if hasattr(self, "classes_"):
            return self.classes_
        return np.arange(self.n_outputs_ if self.n_outputs_ > 1 else 2)

    def predict(self, X):
        """Predicted class labels (classification) or outputs (regression)."""
        z = self.logits(X)
        if self.task == "regression":
            z = z.cpu().numpy()
            return z[:, 0] if z.shape[1] == 1 else z
        idx = (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)
        return self.class_labels()[idx.cpu().numpy()]

    def score(self, X, y):
        """Accuracy (classification) or R^2 (regression)."""
        if self.task == "regression":
            return r2_score(y, self.predict(X))
        return accuracy_score(y, self.predict(X))

    def per_example_loss(self, X, y):
        """Loss of each example, (n,)."""
        net, Xt = self.prepare(X)
        yt = self.encode_y(y, Xt.shape[0])
        out = []
        with torch.no_grad():
            for i, xb in self._batches(Xt):
                z = net(xb)
                z = z[:, None] if z.ndim == 1 else z
                out.append(self.loss_fn(z, yt[i : i + len(xb)]))
        return torch.cat(out).cpu().numpy()

    def activations(self, X, layer):
        """Output of the submodule named ``layer`` (see ``module.named_modules()``), (n, ...)."""
        net, Xt = self.prepare(X)
        mods = dict(net.named_modules())
        if layer not in mods:
            raise ValueError(
                f"No submodule named {layer!r}; available: {[n for n in mods if n][:20]}."
            )
        store = []
        h = mods[layer].register_forward_hook(lambda m, i, o: store.append(o.detach()))
        try:
            with torch.no_grad():
                for _, xb in self._batches(Xt):
                    net(xb)
        finally:
            h.remove()
        return torch.cat(store).cpu().numpy()

    def embedding_layer(self):
        """Name of the module whose output feeds the last Linear layer (the penultimate layer)."""
        net = self.network()
        names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
        if not names:
            raise ValueError("The module has no nn.Linear layer; pass layer= explicitly.")
        return names[-1]

    def embeddings(self, X, layer=None, batch_size=None):
        """Inputs of the last Linear layer (or of ``layer``), flattened: a tensor (n, d)."""
        net, Xt = self.prepare(X)
        layer = layer or self.embedding_layer()
        mods = dict(net.named_modules())
        if layer not in mods:
            raise ValueError(f"No submodule named {layer!r}.")
        store = []
        h = mods[layer].register_forward_hook(lambda m, i, o: store.append(i[0].detach()))
        try:
            with torch.no_grad():
                for _, xb in self._batches(Xt, batch_size):
                    net(xb)
        finally:
            h.remove()
        return torch.cat(store).flatten(1)

    # ------------------------------------------------------------------ gradients
    def gradient_records(self, X, *, output="logits", y=None, method="auto", batch_size=None):
        """Yield ``(start, records)`` of per-example gradients of ``output`` batch by batch.

        ``output`` is "logits" (one gradient per class), "sum_logits", "loss", "margin" (TRAK's
        classification margin) or a callable ``(logits, y) -> (n,) or (n, m)``.
        """
        net, Xt, yt = self._gradient_setup(X, output, y)
        yield from self._record_batches(net, Xt, yt, output, method, batch_size)

    def _gradient_setup(self, X, output, y):
        """``(network, X as a tensor, encoded targets or None)`` for gradients of ``output``."""
        net, Xt = self.prepare(X)
        self._check_trainable(net)
        if isinstance(output, str) and output not in _grad.OUTPUTS:
            raise ValueError(f"output must be one of {list(_grad.OUTPUTS)} or a callable.")
        yt = None
        if y is not None:
            yt = self.encode_y(y, Xt.shape[0])
        elif output == "loss" and self.task == "regression":
            raise ValueError("Gradients of the loss of a regression model need the targets y.")
        elif output in ("loss", "margin") and self.task == "classification":
            yt = self.logits(Xt).argmax(1) if self.n_outputs_ > 1 else (self.logits(Xt)[:, 0] > 0).long()
        return net, Xt, yt

    def _record_batches(self, net, Xt, yt, output, method, batch_size, **plan):
        # plan: reserved= and projector=, counted against the memory budget
        for i, xb in self._batches(Xt, batch_size):
            yb = None if yt is None else yt[i : i + len(xb)]
            yield i, _grad.compute_records(
                net, xb, output=output, y=yb, loss=self.loss_fn, prefixes=self.prefixes_,
                method=method, **plan,
            )

    def per_example_gradients(
        self, X, y=None, *, output="loss", projection_dim=None, projection="rademacher",
        random_state=0, method="auto", batch_size=None,
    ):
        """Per-example gradients (n, p) (or (n, m, p) for a multi-output ``output``).

        With ``projection_dim=k`` the gradients are projected by a seeded, nested random projection
        (see :mod:`skattr.projection`) to (n, k) (or (n, m, k)), scaled so that inner products are
        unbiased.  Parameters are ordered as in ``module.named_parameters()``.

        The result is allocated once and filled batch by batch; it counts against the memory
        budget (``$SKATTR_MEMORY_BUDGET``, :mod:`skattr._memory`) with the gradient engine's
        working memory.  When the result alone exceeds the budget, a ``UserWarning`` says so and
        the budget bounds the working memory only.
        """
        net, Xt, yt = self._gradient_setup(X, output, y)
        n = Xt.shape[0]
        with torch.no_grad():  # the number of outputs differentiated, from one example
            z = net(Xt[:1])
            y1 = yt[:1] if yt is not None else torch.zeros(1, dtype=torch.long, device=z.device)
            m = _grad.output_values(output, z[:, None] if z.ndim == 1 else z, y1, self.loss_fn).shape[1]
        proj = None
        if projection_dim is not None:
            proj = Projector(
                projection, projection_dim, seed_from_random_state(random_state),
                device=self.device_, dtype=self.torch_dtype_,
            )
        k = _grad.n_parameters(net, self.prefixes_) if proj is None else proj.k
        out = torch.empty(n, m, k, dtype=self.torch_dtype_, device=self.device_)
        budget, reserved = _memory.memory_budget(), out.nbytes
        if reserved > _memory.usable(budget):
            # as for a featuriser's output rows (gradients.compute_records): said, not refused
            warnings.warn(
                f"The per-example gradients returned ({n} x {m} x {k} values, "
                f"{reserved / 2**20:.1f} MiB) do not fit the memory budget "
                f"({budget / 2**20:.1f} MiB); the budget bounds the working memory only. Raise "
                f"it ({_memory.ENV_VAR}) to bound both, or pass projection_dim (or fewer "
                f"examples at a time).", UserWarning, stacklevel=2)
            reserved = 0
        batches = self._record_batches(net, Xt, yt, output, method, batch_size,
                                       reserved=reserved, projector=proj)
        # each batch's records (chunk by chunk where deferred) written into the one output
        chunks = ((i0 + c0, i0 + c1, r) for i0, recs in batches
                  for c0, c1, r in record_chunks(recs))
        featurize_batches(chunks, proj, out)
        if proj is not None:
            out.mul_(1.0 / math.sqrt(proj.k))
        G = out.cpu().numpy()
        return G[:, 0] if G.shape[1] == 1 else G

    def fingerprint(self):
        """A hash of the architecture, weights, selected parameters and dtype (for caches)."""
        net = self.network()
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(net).encode())
        h.update(repr((self.prefixes_, self.dtype, self.task)).encode())
        for k, v in net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.task == "classification":
            tags.estimator_type = "classifier"
            tags.classifier_tags = ClassifierTags()
        else:
            tags.estimator_type = "regressor"
            tags.regressor_tags = RegressorTags()
        tags.non_deterministic = False
        # A wrapped (pretrained) module is usable without fit.
        tags.requires_fit = False
        return tags


_EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)
# {network: {(floating input, trailing shape): name of the embedding taking the input or None}}
_INPUT_EMBEDDING = weakref.WeakKeyDictionary()


class _Found(Exception):
    """Stops the forward pass of :func:`_embedding_taking_input` at the first layer it reaches."""


def _embedding_taking_input(net, x1, float_dtype):
    """Name of the ``nn.Embedding`` / ``nn.EmbeddingBag`` that receives the network's input
    ``x1`` (one example) as it is, else None.

    One forward pass of ``x1`` (floating inputs in ``float_dtype``) with a hook before every
    leaf module: the pass stops at the first leaf that is handed the input's data (its
    storage, every value), or at the first leaf that is not an embedding (embeddings called
    on something else, e.g. positions, run).  So a network that converts its input itself
    (``self.emb(x.long())``) or never embeds it is left alone.  Nothing is computed for a
    network without an embedding, and a pass that fails is taken as None (the real call then
    raises torch's own error).
    """
    if not any(isinstance(m, _EMBEDDINGS) for m in net.modules()):
        return None
    p = next(iter(net.parameters()), None)
    xt = x1 if isinstance(x1, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(x1))
    xt = xt.to(device=p.device if p is not None else xt.device,
               dtype=float_dtype if xt.is_floating_point() else None)
    if xt.numel() == 0:
        return None
    names = {id(m): n for n, m in net.named_modules()}
    found, me = [], threading.get_ident()

    def hook(mod, args):
        if threading.get_ident() != me:  # another thread running the network meanwhile
            return
        a = args[0] if args else None
        if (isinstance(a, torch.Tensor) and a.numel() == xt.numel()
                and a.data_ptr() == xt.data_ptr()):
            found.append(mod)
            raise _Found
        if not isinstance(mod, _EMBEDDINGS):
            raise _Found

    # prepended: before a lazy module's own hook materialises it
    handles = [m.register_forward_pre_hook(hook, prepend=True) for m in net.modules()
               if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            net(xt)
    except _Found:
        pass
    except Exception:  # noqa: BLE001 - the network's own error surfaces on the real call
        return None
    finally:
        for h in handles:
            h.remove()
    if found and isinstance(found[0], _EMBEDDINGS):
        return names[id(found[0])]
    return None


def _token_ids(X, name_emb, emb, *, name="X"):
    """``X`` as the token ids ``emb`` indexes with: integral floating values as int64, an id
    outside ``0 .. num_embeddings - 1`` or a fractional value a ``ValueError`` naming it."""
    V = emb.num_embeddings
    layer = f"nn.{type(emb).__name__}({V}, {emb.embedding_dim})"
    tensor = isinstance(X, torch.Tensor)

    def where(mask):
        idx = (torch.nonzero(mask)[0].tolist() if tensor else np.argwhere(mask)[0].tolist())
        return X[tuple(idx)].item(), f"{name}[{', '.join(map(str, idx))}]"

    floating = X.is_floating_point() if tensor else X.dtype.kind in "fc"
    if floating:
        frac = (X != X.round()) if tensor else (X != np.round(X))
        if bool(frac.any()):
            v, at = where(frac)
            raise ValueError(
                f"{name} holds float values ({v!r} at {at}) but the network's first layer "
                f"{name_emb!r} is {layer}: pass integer token ids (e.g. {name}.astype('int64')).")
    lo, hi = (X.min(), X.max())
    if bool(lo < 0) or bool(hi >= V):
        v, at = where((X < 0) | (X >= V))
        v = int(v) if float(v).is_integer() else v
        raise ValueError(
            f"token id {v} at {at} is out of range for {layer} (the network's first layer "
            f"{name_emb!r}): ids must lie in 0 .. {V - 1}.")
    if tensor:
        return X if X.dtype in (torch.int64, torch.int32) else X.to(torch.int64)
    return X if X.dtype in (np.int64, np.int32) else X.astype(np.int64)


@contextlib.contextmanager
def _input_context(net, X):
    """Re-raise a ``RuntimeError`` of the first forward pass on ``X`` as a ``ValueError`` naming
    ``X``'s shape and what the network's first Linear / convolution layer expects (the original
    error as ``__cause__``)."""
    try:
        yield
    except RuntimeError as exc:
        shape = tuple(X.shape)
        expects = "its input"
        for name, m in net.named_modules():
            conv = isinstance(m, torch.nn.modules.conv._ConvNd)
            if conv and not isinstance(m.in_channels, torch.nn.parameter.UninitializedParameter):
                k = len(m.kernel_size)
                expects = (f"(n, {m.in_channels}{', L' * k}) inputs ({m.in_channels} channels, "
                           f"{k} spatial dimension(s); layer {name!r}, {type(m).__name__})")
                break
            if isinstance(m, torch.nn.Linear) and not isinstance(m, torch.nn.LazyLinear):
                expects = (f"inputs whose last dimension is {m.in_features} (layer {name!r}, "
                           f"Linear({m.in_features}, {m.out_features}))")
                break
        raise ValueError(
            f"X has shape {shape} but the network's first layer expects {expects}: the first "
            f"forward pass failed ({str(exc).splitlines()[0]}). Check X's shape and feature count."
        ) from exc


def _has_lazy(module):
    from torch.nn.parameter import is_lazy

    return any(is_lazy(p) for p in module.parameters()) or any(
        is_lazy(b) for b in module.buffers()
    )


warnings.filterwarnings("ignore", message="Lazy modules are a new feature", category=UserWarning)
