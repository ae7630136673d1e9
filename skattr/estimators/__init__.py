"""Kernel and attribution estimators, one module per method family."""

from .ntk import EmbeddingKernel, EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK

__all__ = ["TraceNTK", "PseudoNTK", "EmpiricalNTK", "GradCosKernel", "EmbeddingKernel"]
