"""Kernel and attribution estimators, one module per method family."""

from .loss_kernel import LossKernel
from .ntk import EmbeddingKernel, EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK

__all__ = ["LossKernel", "TraceNTK", "PseudoNTK", "EmpiricalNTK", "GradCosKernel", "EmbeddingKernel"]
