"""The CUDA paths give the CPU's numbers (skipped without a CUDA device).

Projections are drawn from seeded CPU generators and moved to the model's device, so a model on
the GPU and the same model on the CPU must agree to float64 rounding for every estimator.
"""

import numpy as np
import pytest
import torch
from conftest import input_for, make_cnn, make_mlp

from skattr import TorchModel
from skattr.cache import FeatureCache
from skattr.estimators import TRAK, EmpiricalNTK, TraceNTK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _pair(kind):
    make = make_mlp if kind == "mlp" else make_cnn
    return (TorchModel(make(), dtype="float64", device="cpu"),
            TorchModel(make(), dtype="float64", device="cuda"))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("projection_dim", [None, 300])
def test_kernels_on_cuda_equal_cpu(kind, projection_dim):
    cpu, gpu = _pair(kind)
    X = input_for(kind, 20)
    for cls, kw in ((TraceNTK, {}), (EmpiricalNTK, {"output": "blocks"})):
        a = cls(cpu, projection_dim=projection_dim, **kw).fit_transform(X)
        b = cls(gpu, projection_dim=projection_dim, **kw).fit_transform(X)
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    cache = FeatureCache()
    a = TraceNTK(cpu, projection_dim=64).fit(X[:12]).transform(X[8:])
    b = TraceNTK(gpu, projection_dim=64, memory=cache).fit(X[:12]).transform(X[8:])
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("projection", ["kronecker", "factored", None])
def test_trak_on_cuda_equals_cpu(kind, projection, tmp_path):
    cpu, gpu = _pair(kind)
    X, Xt = input_for(kind, 30), input_for(kind, 5, seed=3)
    rng = np.random.RandomState(0)
    y, yt = rng.randint(0, 3, 30), rng.randint(0, 3, 5)
    kw = {"projection_dim": None} if projection is None else {"projection_dim": 48, "projection": projection}
    for store in (None, tmp_path):
        extra = {} if store is None else {"block_size": 7}
        a = TRAK(cpu, ridge=0.1, store=store and store / "cpu", **kw, **extra).fit(X, y)
        b = TRAK(gpu, ridge=0.1, store=store and store / "gpu", **kw, **extra).fit(X, y)
        np.testing.assert_allclose(b.attribute(Xt, yt), a.attribute(Xt, yt), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(b.self_influence(), a.self_influence(), rtol=1e-8, atol=1e-12)
