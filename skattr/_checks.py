"""Validation of what a network produces: finite outputs, gradients and features, and logits.

Input validation lives in :mod:`skattr._validation`; these helpers check the *results* of a
forward or backward pass, so that an estimator raises a ``FloatingPointError`` naming the cause
(non-finite weights, outputs, gradients or features) instead of returning NaN, and warns when a
network's outputs look like probabilities where logits are expected.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = [
    "nonfinite_parameters",
    "check_parameters",
    "check_outputs",
    "check_features",
    "nonfinite_rows",
]

# a row of C >= 2 outputs is taken for probabilities when it is non-negative and sums to 1
# within this tolerance (softmax rounding in float32 is ~1e-7 per entry)
_PROBA_ATOL = 1e-4


def _show(idx, k=5):
    idx = [int(i) for i in idx]
    return f"{idx[:k]}{' ...' if len(idx) > k else ''}"


def nonfinite_rows(t):
    """Indices (ndarray) of the rows (first axis) of ``t`` holding a NaN or an infinity.

    Parameters
    ----------
    t : tensor or array of shape (n, ...)

    Returns
    -------
    rows : ndarray of int
    """
    if isinstance(t, torch.Tensor):
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1) if t.ndim else ~torch.isfinite(t)
        return np.flatnonzero(bad.cpu().numpy())
    t = np.asarray(t)
    return np.flatnonzero(~np.isfinite(t.reshape(t.shape[0], -1)).all(1))


def nonfinite_parameters(module):
    """Names of the parameters and buffers of ``module`` holding a NaN or an infinity.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    names : list of str
        In ``named_parameters()`` then ``named_buffers()`` order.

    Examples
    --------
    >>> import torch
    >>> from skattr._checks import nonfinite_parameters
    >>> lin = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     lin.weight[0, 0] = float("nan")
    >>> nonfinite_parameters(lin)
    ['weight']
    """
    names = []
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                names.append(name)
    return names


def check_parameters(module, *, where):
    """Raise ``FloatingPointError`` when a parameter or buffer of ``module`` is not finite.

    Parameters
    ----------
    module : torch.nn.Module
    where : str
        Names the caller in the message (e.g. ``"TraceNTK.fit"``).
    """
    bad = nonfinite_parameters(module)
    if bad:
        raise FloatingPointError(
            f"{where}: the network has non-finite parameters {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''} (NaN or infinity): every output, gradient and "
            "kernel computed from it would be NaN. Check the training run that produced them "
            "(a learning rate too large, or a loss that overflowed)."
        )


def check_outputs(z, *, where, task="classification", warn_probabilities=True, rows=None):
    """Check a network's outputs: finite, and (for a classifier) logits rather than probabilities.

    Parameters
    ----------
    z : tensor or array of shape (n, C)
        The network's outputs on ``n`` samples.
    where : str
        Names the caller in messages (e.g. ``"TraceNTK.fit"``).
    task : {"classification", "regression"}, default="classification"
        Only a classifier's outputs are checked for probabilities.
    warn_probabilities : bool, default=True
        Warn (``UserWarning``) when every row of ``C >= 2`` outputs is a probability
        distribution (non-negative, summing to 1: a softmax last layer) or its logarithm (a
        log-softmax last layer). skattr's kernels, losses and TRAK take the network's logits.
    rows : array of int, default=None
        The sample index of each row of ``z`` (default ``0 .. n-1``), for the message.

    Raises
    ------
    FloatingPointError
        When an output is NaN or infinite, naming how many samples and which.

    Examples
    --------
    >>> import torch
    >>> from skattr._checks import check_outputs
    >>> check_outputs(torch.randn(4, 3), where="example")  # finite logits: nothing happens
    """
    bad = nonfinite_rows(z)
    n = int(z.shape[0])
    if bad.size:
        idx = bad if rows is None else np.asarray(rows)[bad]
        raise FloatingPointError(
            f"{where}: the network's outputs are NaN or infinite for {bad.size} of {n} samples "
            f"(rows {_show(idx)}): the inputs overflow the network (rescale them, or use "
            "dtype='float64'), or its weights are not finite."
        )
    if not warn_probabilities or task != "classification" or z.ndim != 2 or z.shape[1] < 2 or n == 0:
        return
    zt = torch.as_tensor(z).detach().to(torch.float64)
    kind = None
    if bool((zt >= 0).all()) and bool(((zt.sum(1) - 1).abs() <= _PROBA_ATOL).all()):
        kind = "probabilities (a softmax last layer)"
    elif bool((zt <= 0).all()) and bool((torch.logsumexp(zt, 1).abs() <= _PROBA_ATOL).all()):
        kind = "log-probabilities (a log-softmax last layer)"
    if kind is not None:
        warnings.warn(
            f"{where}: every row of the network's outputs looks like {kind}. skattr expects the "
            "network to return logits (the kernels are those of its outputs, and the loss applies "
            "the softmax itself): remove the final Softmax/LogSoftmax and pass the logits.",
            UserWarning,
            stacklevel=3,
        )


def check_features(F, *, where, what, rows=None, hint=""):
    """Raise ``FloatingPointError`` when rows of ``F`` (gradients, features, norms) are not finite.

    Parameters
    ----------
    F : tensor or array of shape (n, ...)
    where : str
        Names the caller (e.g. ``"TraceNTK.transform"``).
    what : str
        Names the quantity, e.g. ``"the per-example gradients"``.
    rows : array of int, default=None
        The sample index of each row of ``F`` (default ``0 .. n-1``), for the message.
    hint : str, default=""
        Appended to the message (the likely cause and the remedy).
    """
    bad = nonfinite_rows(F)
    if bad.size:
        idx = bad if rows is None else np.asarray(rows)[bad]
        raise FloatingPointError(
            f"{where}: {what} are NaN or infinite for {bad.size} of {int(F.shape[0])} samples "
            f"(rows {_show(idx)}). {hint}".strip()
        )
