"""Kernel-machine surrogates of a network and their fidelity to it."""

from .fidelity import (
    accuracy_differential,
    class_scores,
    kendall_tau_fidelity,
    make_fidelity_scorer,
)
from .kernel_machine import KernelSurrogate

__all__ = [
    "KernelSurrogate",
    "kendall_tau_fidelity",
    "accuracy_differential",
    "class_scores",
    "make_fidelity_scorer",
]
