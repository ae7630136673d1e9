"""The projected kernels as feature maps (``output="features"``): the rows whose inner products
are the projected kernel, streamed in batches, usable by sklearn's linear models (issue 14)."""

import pickle

import numpy as np
import pytest
import torch
from conftest import input_for, make_cnn, make_mlp
from sklearn.base import clone
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge, SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skattr import TorchModel
from skattr.cache import FeatureCache
from skattr.estimators import GradCosKernel, PseudoNTK, TraceNTK


@pytest.fixture(scope="module")
def mlp():
    net = make_mlp(d_in=5, hidden=7, n_out=3)
    X = input_for("mlp", 40)
    return TorchModel(net, dtype="float64"), net, X


def _kernel_and_map(cls, model, X, k, **kw):
    K = cls(model, projection_dim=k, **kw).fit(X).transform(X)
    Phi = cls(model, projection_dim=k, output="features", **kw).fit(X).transform(X)
    return K, Phi


@pytest.mark.parametrize("cls", [TraceNTK, PseudoNTK])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("projection", ["factored", "gaussian"])
def test_features_are_the_projected_kernels_rows(mlp, cls, normalize, projection):
    model, _, X = mlp
    k = 32
    K, Phi = _kernel_and_map(cls, model, X, k, normalize=normalize, projection=projection)
    m = 3 if cls is TraceNTK else 1
    assert Phi.shape == (40, m * k) and Phi.dtype == np.float64
    np.testing.assert_allclose(Phi @ Phi.T, K, rtol=1e-10, atol=1e-12 * np.abs(K).max())
    # and feature_map of a kernel-mode estimator is the same rows
    np.testing.assert_array_equal(
        cls(model, projection_dim=k, normalize=normalize, projection=projection).fit(X[:5]).feature_map(X),
        Phi)


def test_features_converge_to_the_exact_kernel(mlp):
    """Against the exact kernel (no projection; checked against dense jacrev Jacobians in
    test_kernels.py): the feature Gram converges to it as k grows."""
    model, _, X = mlp
    K = TraceNTK(model).fit(X).transform(X)
    errs = []
    for k in (64, 4096):
        Phi = TraceNTK(model, projection_dim=k, projection="gaussian", output="features").fit(X).transform(X)
        errs.append(np.abs(Phi @ Phi.T - K).mean())
    assert errs[1] < errs[0] / 4 and errs[1] < 0.02, errs


def test_same_random_state_same_features_for_any_batch_size(mlp):
    model, _, X = mlp
    runs = [TraceNTK(model, projection_dim=48, output="features", batch_size=b, random_state=3)
            .fit(X).transform(X) for b in (1, 7, 64)]
    for Phi in runs[1:]:
        np.testing.assert_allclose(Phi, runs[0], rtol=1e-12, atol=1e-15)
    other = TraceNTK(model, projection_dim=48, output="features", random_state=4).fit(X).transform(X)
    assert np.abs(other - runs[0]).max() > 1e-3  # a different seed is a different projection


def test_cnn_features_stream_in_batches_and_match_the_kernel():
    net = make_cnn(n_out=3)
    X = input_for("cnn", 12)
    model = TorchModel(net, dtype="float64")
    K = TraceNTK(model, projection_dim=64).fit(X).transform(X)
    Phi = TraceNTK(model, projection_dim=64, output="features", batch_size=5).fit(X).transform(X)
    np.testing.assert_allclose(Phi @ Phi.T, K, rtol=1e-10, atol=1e-12)


def test_gradcos_features_at_given_labels(mlp):
    model, _, X = mlp
    y = np.arange(40) % 3
    K = GradCosKernel(model, labels="given", projection_dim=32).fit_transform(X, y)
    fm = GradCosKernel(model, labels="given", projection_dim=32, output="features")
    Phi = fm.fit_transform(X, y)
    np.testing.assert_allclose(Phi @ Phi.T, K, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(fm.transform(X, y), Phi)
    with pytest.raises(ValueError, match="y has 39 labels for 40 samples"):
        fm.transform(X, y[:39])


def test_fit_keeps_nothing_of_X(mlp):
    model, _, X = mlp
    big = np.concatenate([X] * 25)  # 1000 rows
    small = TraceNTK(model, projection_dim=64, output="features").fit(X[:4])
    large = TraceNTK(model, projection_dim=64, output="features").fit(big)
    assert not hasattr(large, "features_") and not hasattr(large, "n_fit_")
    assert abs(len(pickle.dumps(large)) - len(pickle.dumps(small))) < 64
    # a kernel-mode estimator refitted as a feature map drops its reference features
    est = TraceNTK(model, projection_dim=64).fit(big)
    est.set_params(output="features").fit(X[:4])
    assert not hasattr(est, "fit_diag_") and "_feats" not in est.__dict__
    np.testing.assert_array_equal(est.transform(X), large.transform(X))
    np.testing.assert_allclose(large.diagonal(X), 1.0, rtol=1e-12)


def test_memory_cache_gives_the_same_features(mlp):
    model, _, X = mlp
    cache = FeatureCache()
    plain = TraceNTK(model, projection_dim=32, output="features").fit(X).transform(X)
    cached = TraceNTK(model, projection_dim=32, output="features", memory=cache, batch_size=9)
    np.testing.assert_allclose(cached.fit(X).transform(X), plain, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cached.transform(X), plain, rtol=1e-12, atol=1e-15)  # from the cache


def test_linear_model_on_features_is_the_kernel_machine(mlp):
    """Ridge on Phi (primal, O(n k)) predicts what kernel ridge on Phi Phi^T (dual) does."""
    model, _, X = mlp
    t = np.sin(X).sum(1)
    Xtr, Xte, ttr = X[:30], X[30:], t[:30]
    fm = TraceNTK(model, projection_dim=64, output="features").fit(Xtr)
    primal = make_pipeline(clone(fm), Ridge(alpha=0.1, fit_intercept=False)).fit(Xtr, ttr).predict(Xte)
    ker = TraceNTK(model, projection_dim=64).fit(Xtr)
    dual = KernelRidge(alpha=0.1, kernel="precomputed").fit(ker.transform(Xtr), ttr).predict(ker.transform(Xte))
    np.testing.assert_allclose(primal, dual, rtol=1e-8, atol=1e-10)


def test_sklearn_api_clone_pickle_pipeline_gridsearch():
    from sklearn.datasets import load_digits

    X, y = load_digits(n_class=3, return_X_y=True)
    X, y = (X[:150] / 16).astype("float32"), y[:150]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    model = TorchModel(net, epochs=3, random_state=0).fit(X, y)
    fm = TraceNTK(model, projection_dim=32, output="features")
    assert fm.get_params()["output"] == "features"
    c = clone(fm)
    assert c.get_params()["projection_dim"] == 32 and c.model.fingerprint() == model.fingerprint()
    fitted = fm.fit(X)
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.transform(X[:20]), fitted.transform(X[:20]))
    pipe = make_pipeline(TraceNTK(model, projection_dim=32, output="features"),
                         SGDClassifier(random_state=0))
    search = GridSearchCV(pipe, {"tracentk__projection_dim": [16, 64]}, cv=2).fit(X, y)
    assert search.best_params_["tracentk__projection_dim"] in (16, 64)
    assert search.best_estimator_[0].transform(X[:3]).shape == (3, 3 * search.best_params_["tracentk__projection_dim"])
    assert search.score(X, y) > 0.8
    # partial_fit over streamed chunks: memory bounded by the chunk
    sgd = SGDClassifier(random_state=0)
    for i in range(0, 150, 50):
        sgd.partial_fit(fitted.transform(X[i:i + 50]), y[i:i + 50], classes=np.arange(3))
    assert sgd.score(fitted.transform(X), y) > 0.8


def test_bad_input(mlp):
    model, _, X = mlp
    with pytest.raises(ValueError, match=r"output='features'\) needs projection_dim"):
        TraceNTK(model, output="features").fit(X)
    with pytest.raises(InvalidParameterError, match="'output' parameter"):
        TraceNTK(model, projection_dim=8, output="feature").fit(X)
    fm = TraceNTK(model, projection_dim=8, output="features").fit(X)
    with pytest.raises(ValueError, match="features"):
        fm.transform(X[:, :4])
    with pytest.raises(MemoryError, match="TraceNTK.transform: features of 40 samples x 3 outputs"):
        TraceNTK(model, projection_dim=10**9, output="features").fit(X).transform(X)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fm.transform(bad)


def _lazy_model():
    net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    return TorchModel(net, dtype="float64", random_state=0, epochs=3, batch_size=16, lr=0.1)


def _checks():
    torch.manual_seed(0)
    return [TraceNTK(_lazy_model(), projection_dim=16, output="features")]


_TORCH_HASH = ("joblib.hash of a torch tensor pickles its storage key (its memory address): a deep "
               "copy of the module hashes differently although fit leaves it untouched.")


@parametrize_with_checks(_checks(), expected_failed_checks=lambda est: {
    "check_estimators_overwrite_params": _TORCH_HASH}, xfail_strict=True)
def test_sklearn_estimator_checks_feature_map(estimator, check):
    check(estimator)


def test_scaling_page_examples(tmp_path, monkeypatch):
    """docs/scaling.md's examples, in order, as a script's main module.  The Dask cluster is
    started with threads (``processes=False``) to keep the test short; the page's two-process
    ``LocalCluster`` runs the same code (run by hand, see benchmarks/README.md, "Scale")."""
    import functools
    import re
    from pathlib import Path

    distributed = pytest.importorskip("dask.distributed")
    monkeypatch.setattr(distributed, "LocalCluster",
                        functools.partial(distributed.LocalCluster, processes=False))
    page = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", page.read_text(), re.S | re.M)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, src in enumerate(blocks):
        exec(compile(src, f"{page} (python block {i + 1})", "exec"), namespace)
    assert (tmp_path / "trak_store").is_dir()
