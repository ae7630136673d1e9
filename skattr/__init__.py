"""skattr: scikit-learn-compatible training-data attribution and neural-network kernels."""

from .exceptions import SingleModelWarning, UntrainedModelWarning
from .model import TorchModel
from .training import Callback, TrajectoryRecorder

__version__ = "0.1.0"
__all__ = ["TorchModel", "Callback", "TrajectoryRecorder", "SingleModelWarning", "UntrainedModelWarning",
           "__version__"]
