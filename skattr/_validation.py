"""Input validation shared by every estimator: arrays or tensors of any rank, first axis samples."""

from __future__ import annotations

import numbers
import os

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import check_array, check_random_state

__all__ = [
    "check_input",
    "check_fitted_shape",
    "seed_from_random_state",
    "check_memory",
    "available_memory",
]


def check_input(X, *, name="X", dtype=None, allow_tensor=True):
    """Validate ``X`` (numpy array, array-like or tensor) with samples on the first axis.

    Returns a numpy array (or the tensor itself when ``allow_tensor``) of at least two
    dimensions, finite, non-empty, of a numeric dtype: integer and boolean inputs (token ids)
    are kept as they are (:meth:`TorchModel.to_tensor` decides what the network takes), other
    non-numeric ones are converted to float64.
    """
    if isinstance(X, torch.Tensor) and allow_tensor:
        if X.ndim < 2:
            raise ValueError(
                f"Expected {name} with at least 2 dimensions (n_samples, ...), got a tensor of "
                f"shape {tuple(X.shape)}. Reshape your data with X.reshape(-1, 1) if it has a "
                "single feature or X.reshape(1, -1) if it contains a single sample."
            )
        if X.shape[0] == 0:
            raise ValueError(f"Found {name} with 0 sample(s) (shape={tuple(X.shape)}).")
        if dtype is not None and X.dtype != dtype:
            X = X.to(dtype)
        if X.is_floating_point() and not bool(torch.isfinite(X).all()):
            raise ValueError(f"Input {name} contains NaN or infinity.")
        return X
    if hasattr(X, "__array__") or isinstance(X, (list, tuple)) or sp.issparse(X):
        pass  # check_array rejects sparse input with a message saying so
    else:
        raise TypeError(
            f"Expected {name} to be an array-like or a torch.Tensor, got {type(X).__name__}."
        )
    X = check_array(
        X,
        accept_sparse=False,
        dtype=(None if _integer_like(X) else [np.float64, np.float32]) if dtype is None else dtype,
        allow_nd=True,
        ensure_2d=True,
        ensure_all_finite=True,
        input_name=name,
    )
    return X


def _integer_like(X):
    """Integer or boolean array input (token ids), kept as is by :func:`check_input`."""
    kind = getattr(getattr(X, "dtype", None), "kind", None)
    if kind is None and isinstance(X, (list, tuple)) and not sp.issparse(X):
        try:
            kind = np.asarray(X).dtype.kind
        except (ValueError, TypeError):
            return False
    return kind in ("i", "u", "b")


def check_fitted_shape(X, input_shape, *, name="X", estimator=None):
    """Raise a clear error when ``X``'s trailing shape differs from the fitted one.

    ``estimator`` (a name) appears in the message, worded as scikit-learn words it.
    """
    shape = tuple(X.shape[1:])
    est = estimator or "this estimator"
    if shape != tuple(input_shape):
        n = int(np.prod(shape)) if shape else 0
        if len(shape) == 1 and len(input_shape) == 1:
            raise ValueError(
                f"{name} has {shape[0]} features, but {est} is expecting "
                f"{input_shape[0]} features as input (fitted trailing shape {tuple(input_shape)})."
            )
        raise ValueError(
            f"{name} has trailing shape {shape} ({n} values per sample), but {est} "
            f"was fitted with trailing shape {tuple(input_shape)}."
        )


def seed_from_random_state(random_state) -> int:
    """A 31-bit integer seed drawn from a ``random_state`` the sklearn way.

    An integer is returned as is (mod 2**31) so the same integer always gives the same
    seed, whatever else happened in the process.
    """
    if isinstance(random_state, numbers.Integral):
        return int(random_state) % (2**31)
    rng = check_random_state(random_state)
    return int(rng.randint(0, 2**31 - 1))


def available_memory() -> int:
    """Physical memory in bytes (a conservative bound used for up-front checks)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


def check_memory(n_bytes, what, *, limit=None, hint=""):
    """Raise ``MemoryError`` with a clear message if ``n_bytes`` exceeds ``limit``.

    ``limit`` defaults to half the machine's physical memory.
    """
    if limit is None:
        limit = available_memory() // 2
    if n_bytes > limit:
        raise MemoryError(
            f"{what} would need {n_bytes / 2**30:.2f} GiB, more than the "
            f"{limit / 2**30:.2f} GiB allowed. {hint}".strip()
        )
