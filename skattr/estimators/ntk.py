"""Approximate empirical NTK kernels (Engel et al., ICLR 2024) as scikit-learn transformers.

Each transformer's ``fit(X)`` stores the reference set (its per-example gradient factors or
projected features), and ``transform(X)`` returns ``K(X, X_fit)`` of shape ``(n_samples,
n_fit)``, so ``make_pipeline(TraceNTK(model), SVC(kernel="precomputed"))`` is a kernel machine
whose train and test blocks are sliced correctly under cross-validation.
"""

from __future__ import annotations

import copy
import math
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .. import gradients as _grad
from .._checks import check_features, check_outputs, check_parameters, nonfinite_rows
from .._linalg import sym_gram
from .._validation import check_fitted_shape, check_input, check_memory, seed_from_random_state
from ..cache import FeatureCache, gather_rows
from ..featurize import featurize_batches
from ..featurize import progress as _progress
from ..model import TorchModel
from ..projection import KINDS, Projector

__all__ = ["TraceNTK", "PseudoNTK", "EmpiricalNTK", "GradCosKernel", "EmbeddingKernel"]

_EPS = 1e-30

_OVERFLOW_HINT = (
    "The network's outputs are finite, so the backward pass overflows: the inputs are too large "
    "for the model's dtype (squared gradient norms pass float32's 3e38 once entries pass ~1e19). "
    "Rescale the inputs, or use TorchModel(dtype='float64')."
)


class _BaseKernel(TransformerMixin, BaseEstimator):
    """Shared machinery: validation, the model copy, batching, normalisation."""

    _parameter_constraints = {
        "model": [TorchModel],
        "normalize": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "verbose": ["verbose"],
    }

    def __sklearn_clone__(self):
        # The network is the fixed object this kernel is *of*, not a sub-estimator to refit:
        # sklearn's clone would return an unfitted TorchModel and lose the trained weights, so
        # the model is deep-copied with its weights and every other parameter cloned as usual.
        params = self.get_params(deep=False)
        new = {
            k: copy.deepcopy(v) if k == "model" else clone(v, safe=False) for k, v in params.items()
        }
        return type(self)(**new)

    def _validate(self, X, reset):
        if not isinstance(self.model, TorchModel):
            raise TypeError(
                f"model must be a skattr.TorchModel, got {type(self.model).__name__}; wrap your "
                "network as TorchModel(module)."
            )
        X = check_input(X)
        if reset:
            self.n_features_in_ = int(X.shape[1])
            self.input_shape_ = tuple(X.shape[1:])
        else:
            check_is_fitted(self)
            check_fitted_shape(X, self.input_shape_, estimator=type(self).__name__)
        return X

    def _fit_model(self, X):
        # A private copy: later changes to the user's model cannot silently change this kernel.
        self.model_ = copy.deepcopy(self.model)
        self.model_.prepare(X[:1])
        self._check_network(X)

    # the kernel is one of the network's outputs (a softmax last layer is worth a warning)
    _checks_logits = True

    def _check_network(self, X):
        """Finite weights, and finite logits (not probabilities) on the first chunk of ``X``."""
        where = f"{type(self).__name__}.fit"
        check_parameters(self.model_.network(), where=where)
        if self._checks_logits:
            n = min(X.shape[0], int(self.batch_size or self.model_.batch_size_eval))
            z = self.model_.logits(X[:n])
            check_outputs(z, where=where, task=self.model_.task)

    def _diagnose(self, F, Xt, i0, what, where, hint=""):
        """Raise a ``FloatingPointError`` naming why the rows of ``F`` (a result for the samples
        ``Xt``, numbered from ``i0``) that hold a NaN or an infinity are not finite: the
        network's outputs if those are not finite, else ``what``.  Returns if ``F`` is finite."""
        bad = nonfinite_rows(F)
        if not bad.size:
            return
        if Xt is not None:
            check_outputs(self.model_.logits(Xt[bad]), where=where, warn_probabilities=False,
                          rows=i0 + bad)
        check_features(F, where=where, what=what, rows=np.arange(i0, i0 + F.shape[0]), hint=hint)

    def _chunks(self, n):
        bs = int(self.batch_size or self.model_.batch_size_eval)
        return [(i, min(n, i + bs)) for i in range(0, n, bs)]

    def _to_numpy(self, K):
        return K.detach().cpu().numpy().astype(np.float64, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags


class _GradientKernel(_BaseKernel):
    """Kernels of per-example gradients ``<grad f_o(x), grad f_o(x')>`` of an output ``f``."""

    _output = "logits"  # the output whose gradients define the kernel
    _mode = "trace"  # "trace": sum over outputs; "full": all output pairs

    _parameter_constraints = {
        **_BaseKernel._parameter_constraints,
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "projection": [StrOptions(set(KINDS))],
        "method": [StrOptions({"auto", "structured", "vmap", "autograd"})],
        "memory": [FeatureCache, None],
        "random_state": ["random_state"],
        "output": [StrOptions({"kernel", "features"})],
    }

    def __init__(
        self,
        model,
        *,
        projection_dim=None,
        projection="factored",
        normalize=True,
        method="auto",
        batch_size=None,
        memory=None,
        random_state=0,
        verbose=0,
        output="kernel",
    ):
        self.model = model
        self.projection_dim = projection_dim
        self.projection = projection
        self.normalize = normalize
        self.method = method
        self.batch_size = batch_size
        self.memory = memory
        self.random_state = random_state
        self.verbose = verbose
        self.output = output

    # -- labels used by the output function (only Grad-Cos needs them) -------------------
    def _labels(self, X, y):
        return None

    def _records(self, Xt, y, **plan):
        info = {}
        recs = _grad.compute_records(
            self.model_.network(),
            Xt,
            output=self._output,
            y=y,
            loss=self.model_.loss_fn,
            prefixes=self.model_.prefixes_,
            method=self.method,
            info=info,
            **plan,  # reserved=, projector=: counted against the memory budget
        )
        if getattr(self, "engine_", None) is None:
            self.engine_ = {k: info.get(k) for k in ("engine", "reason")}
            if self.verbose:
                print(f"[skattr] {type(self).__name__}: gradient engine {self.engine_['engine']!r} "
                      f"({self.engine_['reason']})", flush=True)
        return recs

    def _featurize(self, Xt, y, start, k):
        """Unscaled projected features (n, m, k) of rows ``start:start+k``."""
        proj = Projector(
            self.projection, k, self._seed, start=start,
            device=self.model_.device_, dtype=self.model_.torch_dtype_,
        )
        chunks = self._chunks(Xt.shape[0])
        out = Xt.shape[0] * self._n_out() * k * torch.finfo(self.model_.torch_dtype_).bits // 8
        batches = ((i0, i1, self._records(Xt[i0:i1], None if y is None else y[i0:i1],
                                          reserved=out, projector=proj))
                   for i0, i1 in _progress(chunks, len(chunks), self.verbose, f"{type(self).__name__} features"))
        return featurize_batches(batches, proj, n=Xt.shape[0])

    def _cache_key(self):
        return (self.model_.fingerprint(), type(self).__name__, self._output, self.projection,
                self._seed, self.method)

    def _features(self, Xt, y, gather=True):
        """Unscaled features (n, m, k), and the samples' hashes in ``memory`` (or ``None``).

        ``gather=False`` (with ``memory``): only cache the rows; the features are None.
        """
        k = int(self.projection_dim)
        if self.memory is None:
            return self._featurize(Xt, y, 0, k), None
        rows, compute = self._cache_rows(Xt, y)
        return self.memory.get(self._cache_key(), rows, k, compute, return_hashes=True, gather=gather)

    def _cache_rows(self, Xt, y):
        """The rows keyed in ``memory`` and the function computing their features."""
        if y is not None:  # y enters the key through the per-sample content: a last column
            rows = torch.cat([Xt.flatten(1), y[:, None].to(Xt.dtype)], 1)

            def compute(R, start, kk):
                return self._featurize(R[:, :-1].reshape(-1, *Xt.shape[1:]), R[:, -1].long(), start, kk)

            return rows, compute

        def compute(R, start, kk):
            return self._featurize(R, None, start, kk)

        return Xt, compute

    def _cached_gram(self, hx):
        """``(K(X, X_fit), K(X, X))`` unnormalised, from ``memory``'s Gram, or ``None``."""
        if self.memory is None or self._mode != "trace" or hx is None:
            return None
        k = int(self.projection_dim)
        out = self.memory.gram(self._cache_key(), hx, self._fit_hashes, k)
        return None if out is None else (out[0].div_(k), out[1] / k)

    def _check_size(self, n, m):
        isz = torch.finfo(self.model_.torch_dtype_).bits // 8
        if self.projection_dim is not None:
            check_memory(
                n * m * int(self.projection_dim) * isz,
                f"Projected features for {n} samples x {m} outputs x projection_dim="
                f"{self.projection_dim}",
                hint="Lower projection_dim or fit on fewer samples.",
            )

    def fit(self, X, y=None):
        """Store the reference set ``X`` (its gradient factors, or projected features).

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            Only used by kernels of the loss (Grad-Cos); defaults to the network's predictions.
        """
        self._validate_params()
        if self.output == "features" and self.projection_dim is None:
            raise ValueError(
                f"{type(self).__name__}(output='features') needs projection_dim: the exact "
                "feature map has one column per parameter and output."
            )
        X = self._validate(X, reset=True)
        self._fit_model(X)
        self._seed = seed_from_random_state(self.random_state)
        self.engine_ = None  # set by the first gradient records
        if self.output == "features":
            # a feature map keeps nothing of X: fit's memory does not grow with n_samples
            for a in ("_feats", "_feats_src", "fit_records_", "fit_diag_", "n_fit_"):
                self.__dict__.pop(a, None)
            x1 = self.model_.to_tensor(X[:1])
            self._records(x1, self._labels(x1, None))  # sets engine_ (transform changes no state)
            return self
        Xt = self.model_.to_tensor(X)
        yt = self._labels(Xt, y)
        m = self._n_out()
        self._check_size(Xt.shape[0], m)
        if self.projection_dim is None:
            self._check_exact_size(Xt, yt)
            self._fit_hashes = None
            self.__dict__.pop("_feats", None)
            self.__dict__.pop("_feats_src", None)
            chunks = self._chunks(Xt.shape[0])
            self.fit_records_ = [
                self._records(Xt[i0:i1], None if yt is None else yt[i0:i1])
                for i0, i1 in _progress(chunks, len(chunks), self.verbose, f"{type(self).__name__} fit")
            ]
            self.fit_diag_ = torch.cat([_grad.self_gram(r, self._mode) for r in self.fit_records_])
        elif self.memory is not None and self._mode == "trace":
            # the cached Gram serves every kernel of the fit set: gather its features only
            # when something needs them (transforming samples whose Gram is not cached)
            k = int(self.projection_dim)
            rows, compute = self._cache_rows(Xt, yt)
            self._fit_hashes, view, norms, keep = self.memory.fit_view(self._cache_key(), rows, k, compute)
            # views of the cached blocks (not copies): valid whatever later happens to memory;
            # a small part of the cache is gathered now rather than keeping its blocks alive
            self._feats, self._feats_src = (None, view) if keep else (self._scale(gather_rows(*view)), None)
            self.fit_diag_ = norms / k
        else:
            F, self._fit_hashes = self._features(Xt, yt)
            self._feats, self._feats_src = self._scale(F), None
            self.fit_diag_ = self._feat_self(self._feats)
        self._check_rows(self.fit_diag_, Xt, 0, f"{type(self).__name__}.fit")
        self.n_fit_ = int(Xt.shape[0])
        return self

    def _what(self):
        return "the per-example loss gradients" if self._output == "loss" else "the per-example gradients"

    def _check_rows(self, d, Xt, i0, where, what=None):
        """Raise a ``FloatingPointError`` naming the cause when ``d`` (per-sample squared norms or
        kernel rows of the samples ``Xt``, numbered from ``i0``) holds a NaN or an infinity."""
        if not bool(torch.isfinite(d).all()):
            self._diagnose(d, Xt, i0, what or f"{self._what()} (or their squared norms)", where,
                           _OVERFLOW_HINT)

    @property
    def features_(self):
        """The fit set's projected features (n_fit, C, projection_dim), scaled by 1/sqrt(k);
        with a ``memory`` they are gathered from it on first use."""
        if "_feats" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no features_ (not fitted, or exact).")
        feats, src = self._feats, self.__dict__.get("_feats_src")
        if feats is None and src is not None:
            feats = self._scale(gather_rows(*src))
            self._feats, self._feats_src = feats, None
        return self._feats if feats is None else feats

    def __getstate__(self):
        if self.__dict__.get("_feats", 0) is None:
            self.features_  # a pickle carries the features, not views of the cache  # noqa: B018
        return super().__getstate__()

    def _n_out(self):
        if self._output == "logits":
            return self.model_.n_outputs_
        return 1

    def _check_exact_size(self, Xt, yt):
        recs = self._records(Xt[:1], None if yt is None else yt[:1])
        # factors, plus the dense gradients kept for shared-weight (Conv) layers
        per = sum(r.nbytes() + r.dense_nbytes() for r in recs)
        check_memory(
            per * Xt.shape[0],
            f"Exact gradient factors for {Xt.shape[0]} samples",
            hint="Use projection_dim=k to store k projected features per output instead.",
        )

    @staticmethod
    def _scale(F):
        """Unscaled features (n, m, k) divided by sqrt(k): in place when ``F`` is this call's
        own tensor (computed, or gathered from ``memory``), instead of a fresh copy; a view of
        the cache is copied."""
        k = F.shape[-1]
        return F / math.sqrt(k) if F._is_view() else F.div_(math.sqrt(k))

    def _feat_self(self, F):
        if self._mode == "trace":  # sum of squares without an (n, m, k) temporary
            return torch.linalg.vector_norm(F.flatten(1), dim=1) ** 2
        return torch.einsum("nmk,nok->nmo", F, F)

    def _feat_gram(self, A, B):
        if self._mode == "trace":
            return A.flatten(1) @ B.flatten(1).T
        return torch.einsum("nmk,Nok->nNmo", A, B)

    def _kernel_chunks(self, X, y=None):
        """Yield (i0, i1, K_chunk, diag_chunk) of the unnormalised kernel against the fit set.

        ``X=None`` is the fit set itself, from the stored features or gradient factors; ``y``
        the labels of ``X``'s rows (Grad-Cos with ``labels="given"``), default predicted.
        """
        if X is None:
            if self.projection_dim is not None:
                cached = self._cached_gram(self._fit_hashes)
                if cached is not None:
                    yield 0, cached[0].shape[0], cached[0], cached[1]
                    return
                F = self.features_
                if self._mode == "trace":  # symmetric: half the products, mirrored
                    yield 0, F.shape[0], sym_gram(F.flatten(1)), self.fit_diag_
                    return
                for i0, i1 in self._chunks(F.shape[0]):
                    yield i0, i1, self._feat_gram(F[i0:i1], F), self.fit_diag_[i0:i1]
                return
            # symmetric: a block below the diagonal is the transpose of one computed above it
            i0, upper = 0, {}
            recs = self.fit_records_
            for i, rx in enumerate(recs):
                i1 = i0 + _grad.records_shape(rx)[0]
                row = []
                for j, rf in enumerate(recs):
                    if j < i:
                        B = upper.pop((j, i))
                        row.append(B.T if self._mode == "trace" else B.permute(1, 0, 3, 2))
                    else:
                        row.append(_grad.gram(rx, rf, self._mode))
                        if j > i:
                            upper[(i, j)] = row[-1]
                yield i0, i1, torch.cat(row, dim=1), self.fit_diag_[i0:i1]
                i0 = i1
            return
        Xt = self.model_.to_tensor(X)
        yt = self._labels(Xt, y)
        if self.projection_dim is not None:
            # with a cached Gram the rows' features are not needed: cache them, then look up
            F, hx = self._features(Xt, yt, gather=self.memory is None or self._mode != "trace")
            cached = self._cached_gram(hx)
            if cached is not None:
                yield 0, Xt.shape[0], cached[0], cached[1]
                return
            if F is None:
                try:
                    F = self.memory.take(self._cache_key(), hx, int(self.projection_dim))
                except KeyError:  # the cache was cleared meanwhile: compute them
                    F, _ = self._features(Xt, yt)
            F = self._scale(F)
            for i0, i1 in self._chunks(Xt.shape[0]):
                A = F[i0:i1]
                yield i0, i1, self._feat_gram(A, self.features_), self._feat_self(A)
            return
        chunks = self._chunks(Xt.shape[0])
        for i0, i1 in _progress(chunks, len(chunks), self.verbose, f"{type(self).__name__} transform"):
            rx = self._records(Xt[i0:i1], None if yt is None else yt[i0:i1])
            K = torch.cat([_grad.gram(rx, rf, self._mode) for rf in self.fit_records_], dim=1)
            yield i0, i1, K, _grad.self_gram(rx, self._mode)

    def _normalize(self, K, dx):
        df = self.fit_diag_
        if self._mode == "trace":
            return K / torch.sqrt(torch.clamp(dx[:, None] * df[None, :], min=_EPS))
        tx = torch.diagonal(dx, dim1=-2, dim2=-1).sum(-1)
        tf = torch.diagonal(df, dim1=-2, dim2=-1).sum(-1)
        return K / torch.sqrt(torch.clamp(tx[:, None] * tf[None, :], min=_EPS))[:, :, None, None]

    def _checked_chunks(self, X, y=None, where="transform"):
        """``_kernel_chunks`` with every chunk's self-kernel and kernel checked for NaN/inf."""
        where = f"{type(self).__name__}.{where}"
        Xt = None
        for i0, i1, K, dx in self._kernel_chunks(X, y):
            if X is not None and not (bool(torch.isfinite(dx).all()) and bool(torch.isfinite(K).all())):
                Xt = self.model_.to_tensor(X) if Xt is None else Xt
                self._check_rows(dx, Xt[i0:i1], i0, where)
                self._check_rows(K, Xt[i0:i1], i0, where, what=f"the kernel rows (from {self._what()})")
            elif X is None:
                self._check_rows(K, None, i0, where, what=f"the kernel rows (from {self._what()})")
            yield i0, i1, K, dx

    def _transform_tensor(self, X, y=None):
        parts = []
        for _, _, K, dx in self._checked_chunks(X, y):
            parts.append(self._normalize(K, dx) if self.normalize else K)
        return torch.cat(parts)

    def transform(self, X):
        """Kernel ``K(X, X_fit)`` of shape (n_samples, n_fit).

        Raises ``FloatingPointError`` naming the cause (the network's outputs, or its
        gradients) when the kernel would hold a NaN or an infinity.
        """
        check_is_fitted(self)
        if self.output == "features":
            return self._feature_rows(X)
        X = self._validate(X, reset=False)
        return self._format(self._transform_tensor(X))

    def _format(self, K):
        return self._to_numpy(K)

    def fit_transform(self, X, y=None):
        """The training block ``K(X, X)``: ``fit(X, y).transform(X)``, reusing the reference
        set's gradients instead of computing them twice (what a
        :class:`~sklearn.pipeline.Pipeline` calls when it fits).

        Every sample stands for the same point on both sides (for Grad-Cos: the same label,
        see ``labels``), so the result is a symmetric positive semi-definite Gram matrix.
        """
        self.fit(X, y)
        if self.output == "features":
            return self._feature_rows(X, y, where="fit_transform")
        return self._format(self._transform_tensor(None))

    def diagonal(self, X):
        """``K(x, x)`` for each sample (1 when ``normalize=True``), shape (n_samples,)."""
        check_is_fitted(self)
        if self.output == "features":
            F = self._feature_rows(X, where="diagonal")
            return np.einsum("ij,ij->i", F, F)
        X = self._validate(X, reset=False)
        out = []
        for _, _, _, dx in self._checked_chunks(X, where="diagonal"):
            d = dx if self._mode == "trace" else torch.diagonal(dx, dim1=-2, dim2=-1).sum(-1)
            out.append(torch.ones_like(d) if self.normalize else d)
        return self._to_numpy(torch.cat(out))

    def feature_map(self, X):
        """Explicit features Phi(X) with ``Phi(X) Phi(X_fit)^T = K(X, X_fit)`` (projected only).

        Shape (n_samples, m * projection_dim): a linear model on these features is the kernel
        machine at O(n k) cost, which scales where an n x n kernel matrix does not.  What
        ``transform`` returns with ``output="features"``.
        """
        check_is_fitted(self)
        return self._feature_rows(X, where="feature_map")

    def _feature_rows(self, X, y=None, where="transform"):
        """Phi(X) as float64 (n, m * k), computed ``batch_size`` rows at a time straight into
        the output: beyond the output, memory is one batch's gradients and features."""
        name = type(self).__name__
        if self.projection_dim is None:
            raise ValueError("feature_map needs projection_dim to be set (the exact map is p-dimensional).")
        X = self._validate(X, reset=False)
        Xt = self.model_.to_tensor(X)
        n, m, k = Xt.shape[0], self._n_out(), int(self.projection_dim)
        if y is not None:
            y = np.asarray(y)
            if y.shape[0] != n:
                raise ValueError(f"{name}.{where}: y has {y.shape[0]} labels for {n} samples.")
        check_memory(n * m * k * 8, f"{name}.{where}: features of {n} samples x {m} outputs x "
                     f"projection_dim={k} (float64)",
                     hint="Transform chunks of rows (e.g. for SGDClassifier.partial_fit), or "
                     "lower projection_dim.")
        out = np.empty((n, m * k), dtype=np.float64)
        # one projector for every batch (its random rows are drawn once); with a memory, the
        # rows go through the cache instead
        proj = None if self.memory is not None else Projector(
            self.projection, k, self._seed, device=self.model_.device_, dtype=self.model_.torch_dtype_)
        chunks = self._chunks(n)
        for i0, i1 in _progress(chunks, len(chunks), self.verbose, f"{name} features"):
            xc = Xt[i0:i1]
            yc = self._labels(xc, None if y is None else y[i0:i1])
            if proj is None:
                F = self._features(xc, yc)[0]
            else:
                out_c = (i1 - i0) * m * k * torch.finfo(self.model_.torch_dtype_).bits // 8
                recs = self._records(xc, yc, reserved=out_c, projector=proj)
                F = featurize_batches([(0, i1 - i0, recs)], proj, n=i1 - i0)
            F = self._scale(F)
            norms = torch.linalg.vector_norm(F.flatten(1), dim=1)
            self._check_rows(norms, xc, i0, f"{name}.{where}",
                             what=f"the projected features (from {self._what()})")
            if self.normalize:
                F = F / torch.clamp(norms, min=math.sqrt(_EPS))[:, None, None]
            out[i0:i1] = F.flatten(1).cpu().numpy()
        return out


class TraceNTK(_GradientKernel):
    """Trace neural tangent kernel: ``K(x, x') = sum_c <grad f_c(x), grad f_c(x')>``.

    The eNTK paper's most consistent surrogate kernel.  With ``normalize=True`` (default) the
    kernel is cosine-normalised with both diagonals, ``K(x, x') / sqrt(K(x, x) K(x', x'))``.
    With ``projection_dim=k`` the per-class gradients are projected by one seeded random matrix
    ``P`` (the same for every class): ``sum_c (P grad f_c(x)) . (P grad f_c(x')) / k``.

    Parameters
    ----------
    model : TorchModel
        The network (trained, or wrapped as is).
    projection_dim : int or None, default=None
        None computes the exact kernel (structured: no Jacobian is formed for Linear layers).
    projection : {"factored", "kronecker", "rademacher", "gaussian", "sparse"}, default="factored"
        Kind of random projection, see :mod:`skattr.projection`.
    normalize : bool, default=True
    method : {"auto", "structured", "vmap"}, default="auto"
        Gradient engine; "auto" uses the structured one when every layer with parameters is a
        Linear, Conv or norm layer, else ``torch.func.vmap(jacrev)``.
    batch_size : int, default=None
        Samples per chunk (default: the model's ``batch_size_eval``).
    memory : FeatureCache, default=None
        Shared cache of projected features (reused across clones, folds and projection sizes).
    random_state : int, RandomState instance or None, default=0
        Seeds the projection.  The same value gives the same kernel for any batch size.
    verbose : int, default=0
    output : {"kernel", "features"}, default="kernel"
        "kernel": ``transform(X)`` is ``K(X, X_fit)``.  "features" (needs ``projection_dim``):
        the estimator is the projected kernel's explicit feature map, as sklearn's ``Nystroem``
        is an approximate one; ``fit`` keeps nothing of ``X`` and ``transform(X)`` is
        ``Phi(X)`` of shape (n_samples, C * projection_dim), computed ``batch_size`` rows at a
        time, with ``Phi(X) Phi(X')^T`` the projected kernel.  So
        ``make_pipeline(TraceNTK(model, projection_dim=1024, output="features"),
        SGDClassifier())`` is the kernel machine with memory linear in n_samples instead of an
        n x n kernel matrix.

    Attributes
    ----------
    model_ : TorchModel
        A private copy of ``model``.
    n_fit_ : int
    fit_diag_ : tensor of shape (n_fit,)
        ``K(x_j, x_j)`` of the reference samples.
    features_ : tensor of shape (n_fit, C, projection_dim)
        Scaled projected features (projected kernels only).
    fit_records_ : list
        Per-chunk gradient factors (exact kernels only).
    n_features_in_ : int
    input_shape_ : tuple

    Examples
    --------
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import TraceNTK
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(10, 4).numpy()
    >>> K = TraceNTK(TorchModel(net)).fit(X).transform(X[:3])
    >>> K.shape
    (3, 10)
    >>> bool(abs(K[0, 0] - 1) < 1e-5)
    True
    >>> fmap = TraceNTK(TorchModel(net), projection_dim=64, output="features").fit(X)
    >>> Phi = fmap.transform(X)            # (10, 3 * 64): rows of the projected kernel
    >>> Kp = TraceNTK(TorchModel(net), projection_dim=64).fit(X).transform(X)
    >>> Phi.shape, bool(abs(Phi @ Phi.T - Kp).max() < 1e-5)
    ((10, 192), True)
    """

    _output = "logits"
    _mode = "trace"


class PseudoNTK(TraceNTK):
    """Pseudo NTK (Mohamadi et al., 2023): the kernel of the gradient of the summed logits.

    ``K(x, x') = <grad sum_c f_c(x), grad sum_c f_c(x')> / C``, cosine-normalised by default.
    Parameters and attributes as :class:`TraceNTK` (features have one output instead of C).

    Examples
    --------
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import PseudoNTK
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(10, 4).numpy()
    >>> PseudoNTK(TorchModel(net), projection_dim=64).fit(X).transform(X).shape
    (10, 10)
    """

    _output = "sum_logits"


class EmpiricalNTK(TraceNTK):
    """The full empirical NTK: a C x C block ``<grad f_c(x), grad f_c'(x')>`` per pair.

    As a scalar kernel on (sample, class) pairs, the form vector-valued kernel ridge regression
    consumes: with ``output="flat"`` (default) ``transform(X)`` has shape
    ``(n_samples * C, n_fit * C)``, row ``i * C + c`` and column ``j * C + c'`` holding block
    entry ``(c, c')`` of ``K(x_i, x_j)``; ``KernelRidge(kernel="precomputed")`` fitted on it with
    the targets ``Y.ravel()`` (``Y`` of shape (n_fit, C)) is the vector-valued kernel machine
    (:class:`skattr.surrogates.KernelSurrogate` does this for you).  ``output="blocks"`` gives
    ``(n_samples, n_fit, C, C)``.  With ``normalize=True`` each block is divided by
    ``sqrt(tr K(x, x) tr K(x', x'))``, so its trace is the normalised trace NTK.

    Parameters
    ----------
    output : {"flat", "blocks"}, default="flat"
    normalize : bool, default=False
    Other parameters as :class:`TraceNTK`.

    Examples
    --------
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import EmpiricalNTK
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(10, 4).numpy()
    >>> EmpiricalNTK(TorchModel(net)).fit(X).transform(X[:2]).shape
    (6, 30)
    """

    _mode = "full"
    _parameter_constraints = {
        **TraceNTK._parameter_constraints,
        "output": [StrOptions({"flat", "blocks"})],
    }

    def __init__(
        self,
        model,
        *,
        output="flat",
        projection_dim=None,
        projection="factored",
        normalize=False,
        method="auto",
        batch_size=None,
        memory=None,
        random_state=0,
        verbose=0,
    ):
        super().__init__(
            model, projection_dim=projection_dim, projection=projection, normalize=normalize,
            method=method, batch_size=batch_size, memory=memory, random_state=random_state,
            verbose=verbose,
        )
        self.output = output

    def _format(self, K):
        # transform: (n * C, n_fit * C) for output="flat", (n, n_fit, C, C) for "blocks"
        if self.output == "flat":
            n, nf, C, _ = K.shape
            K = K.permute(0, 2, 1, 3).reshape(n * C, nf * C)
        return self._to_numpy(K)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # one row per (sample, class): the sample-count invariants of transformers do not hold
        tags.non_deterministic = False
        return tags


class GradCosKernel(TraceNTK):
    """Grad-Cos: the cosine of per-example loss gradients, ``cos(grad l(x, c), grad l(x', c'))``.

    The loss gradient depends on a label, so the kernel is one on (sample, label) pairs; which
    label each sample stands for is the same rule on both sides of the kernel, so that the
    training block ``fit_transform(X, y)`` is a symmetric positive semi-definite Gram matrix
    (what ``make_pipeline(GradCosKernel(model), SVC(kernel="precomputed")).fit(X, y)`` feeds
    the SVC):

    - ``labels="predicted"`` (default): every sample at the network's predicted label, in
      ``fit`` and in ``transform``.  ``y`` given to ``fit`` is checked against the network's
      classes but not used: the kernel is a function of the inputs alone, and
      ``fit(X, y).transform(X)`` equals ``fit_transform(X, y)``.
    - ``labels="given"``: each sample at the label given with it, ``fit(X, y)`` for the
      reference set and ``transform(X, y)`` for the rows; a sample given without a label (a
      pipeline's test points, whose labels are unknown) at the network's predicted label.
      ``fit_transform(X, y)`` equals ``fit(X, y).transform(X, y)``, the Gram matrix of the
      (sample, given label) pairs; the usual convention of data attribution (training points'
      loss gradients at their own labels).

    Parameters
    ----------
    model : TorchModel
        A classifier (for a regression network the loss gradient at its own prediction is 0).
    labels : {"predicted", "given"}, default="predicted"
        The labelling rule above.
    normalize : bool, default=True
        ``False`` gives the raw inner product of loss gradients.
    Other parameters as :class:`TraceNTK`.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import GradCosKernel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(10, 4).numpy(), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    >>> GradCosKernel(TorchModel(net)).fit(X, y).transform(X).shape
    (10, 10)
    >>> K = GradCosKernel(TorchModel(net), labels="given").fit_transform(X, y)
    >>> bool(np.allclose(K, K.T)), bool(np.linalg.eigvalsh(K).min() > -1e-6)
    (True, True)
    """

    _output = "loss"
    _parameter_constraints = {
        **TraceNTK._parameter_constraints,
        "labels": [StrOptions({"predicted", "given"})],
    }

    def __init__(
        self,
        model,
        *,
        labels="predicted",
        projection_dim=None,
        projection="factored",
        normalize=True,
        method="auto",
        batch_size=None,
        memory=None,
        random_state=0,
        verbose=0,
        output="kernel",
    ):
        super().__init__(
            model, projection_dim=projection_dim, projection=projection, normalize=normalize,
            method=method, batch_size=batch_size, memory=memory, random_state=random_state,
            verbose=verbose, output=output,
        )
        self.labels = labels

    def _labels(self, Xt, y):
        model = self.model_
        if model.task == "regression":
            # At a regression model's own prediction the loss gradient is zero: there is no
            # label to take for new samples, so the cosine would be undefined.
            raise ValueError(
                "GradCosKernel needs a classification model: for regression the loss gradient at "
                "the model's own prediction (used for samples passed to transform) is zero."
            )
        if y is not None:
            yt = model.encode_y(np.asarray(y), Xt.shape[0])  # labels must be the network's
            if self.labels == "given":
                return yt
        z = model.logits(Xt)
        return (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)

    def fit(self, X, y=None):
        """Store the reference set ``X`` at the labels the ``labels`` rule gives it.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            The reference labels, checked against the network's classes; used only with
            ``labels="given"`` (without them, the network's predicted labels).

        Returns
        -------
        self : GradCosKernel
        """
        return super().fit(X, y)

    def transform(self, X, y=None):
        """Kernel ``K(X, X_fit)`` of shape (n_samples, n_fit).

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            With ``labels="given"``: the labels of the rows (default: the network's predicted
            labels).  Refused with ``labels="predicted"``, where every row is at its predicted
            label.

        Returns
        -------
        K : ndarray of shape (n_samples, n_fit)
        """
        check_is_fitted(self)
        if y is not None and self.labels != "given":
            raise ValueError(
                "GradCosKernel.transform takes y only with labels='given'; with "
                f"labels={self.labels!r} every row is at the network's predicted label."
            )
        if self.output == "features":
            return self._feature_rows(X, y)
        X = self._validate(X, reset=False)
        return self._format(self._transform_tensor(X, y))


class EmbeddingKernel(_BaseKernel):
    """Embedding kernel: cosine (or inner product) of a hidden layer's features.

    By default the features are the input of the network's last ``nn.Linear`` (the penultimate
    representation).

    Parameters
    ----------
    model : TorchModel
    layer : str, default=None
        Name of the submodule whose *input* is the embedding (default: the last Linear).
    normalize : bool, default=True
    batch_size : int, default=None
    verbose : int, default=0

    Attributes
    ----------
    model_, embeddings_ (tensor (n_fit, d)), n_fit_, n_features_in_, input_shape_

    Examples
    --------
    >>> import torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators import EmbeddingKernel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(10, 4).numpy()
    >>> EmbeddingKernel(TorchModel(net)).fit(X).transform(X[:4]).shape
    (4, 10)
    """

    _parameter_constraints = {**_BaseKernel._parameter_constraints, "layer": [str, None]}

    def __init__(self, model, *, layer=None, normalize=True, batch_size=None, verbose=0):
        self.model = model
        self.layer = layer
        self.normalize = normalize
        self.batch_size = batch_size
        self.verbose = verbose

    # the kernel does not depend on the network's outputs: no softmax warning
    _checks_logits = False

    def _embed(self, X, where):
        E = self.model_.embeddings(X, self.layer, batch_size=self.batch_size)
        what = f"the embeddings (inputs of layer {self.layer or self.model_.embedding_layer()!r})"
        where = f"{type(self).__name__}.{where}"
        hint = ("The inputs overflow the network or the embeddings' squared norms overflow the "
                "model's dtype: rescale the inputs, or use TorchModel(dtype='float64').")
        check_features(E, where=where, what=what, hint=hint)
        norms = torch.linalg.vector_norm(E, dim=1, keepdim=True)
        check_features(norms, where=where, what=f"the norms of {what}", hint=hint)
        if self.normalize:
            E = E / torch.clamp(norms, min=math.sqrt(_EPS))
        return E

    def fit(self, X, y=None):
        """Store the embeddings of the reference set ``X``."""
        self._validate_params()
        X = self._validate(X, reset=True)
        self._fit_model(X)
        self.embeddings_ = self._embed(X, "fit")
        self.n_fit_ = int(X.shape[0])
        return self

    def transform(self, X):
        """Kernel ``K(X, X_fit)`` of shape (n_samples, n_fit)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        K = self._embed(X, "transform") @ self.embeddings_.T
        check_features(K, where=f"{type(self).__name__}.transform", what="the kernel rows",
                       hint="The embeddings' inner products overflow the model's dtype: use "
                       "normalize=True, or TorchModel(dtype='float64').")
        return self._to_numpy(K)
