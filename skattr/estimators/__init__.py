"""Kernel and attribution estimators, one module per method family."""

from .base import AttributionKernel, BaseAttributor
from .concept import ConceptProbe, remove_and_retrain
from .hydra import HYDRA
from .influence import InfluenceFunction
from .loss_kernel import LossKernel
from .ntk import EmbeddingKernel, EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK
from .representation import RepresentationTracer
from .tracin import TracIn
from .trak import TRAK

__all__ = [
    "AttributionKernel",
    "BaseAttributor",
    "TRAK",
    "TracIn",
    "InfluenceFunction",
    "HYDRA",
    "RepresentationTracer",
    "ConceptProbe",
    "remove_and_retrain",
    "LossKernel",
    "TraceNTK",
    "PseudoNTK",
    "EmpiricalNTK",
    "GradCosKernel",
    "EmbeddingKernel",
]
