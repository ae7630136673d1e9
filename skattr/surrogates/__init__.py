"""Kernel-machine surrogates of a network and their fidelity to it."""

from .fidelity import (
    accuracy_differential,
    align_scores,
    class_scores,
    kendall_tau_fidelity,
    label_positions,
    make_fidelity_scorer,
)
from .kernel_machine import KernelSurrogate

__all__ = [
    "KernelSurrogate",
    "kendall_tau_fidelity",
    "accuracy_differential",
    "class_scores",
    "make_fidelity_scorer",
    "label_positions",
    "align_scores",
]
