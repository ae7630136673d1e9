"""Warnings raised by skattr (as :mod:`sklearn.exceptions` holds scikit-learn's)."""

from __future__ import annotations

__all__ = ["SingleModelWarning", "UntrainedModelWarning"]


class SingleModelWarning(UserWarning):
    """An attribution method that needs several models was fitted with one.

    Raised by :class:`skattr.estimators.TRAK` when it attributes a single network that fits its
    training set: TRAK's reweighting ``1 - p`` is then near zero for most training examples and
    ranks the scores more than the similarity to the target does.  The message says what was
    measured and what to use instead (``n_models``, or a method built for one model).
    """


class UntrainedModelWarning(UserWarning):
    """A single model to attribute predicts its own training set no better than chance.

    Raised by :class:`skattr.estimators.TRAK` when the one model it attributes has a median
    ``p(true class)`` over the training set below 1.25 / (number of classes): most often a
    ``TorchModel`` that was never fitted (``TRAK(model)`` attributes ``model`` as it is).
    """
