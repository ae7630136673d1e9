"""LDS, the subset-retraining harness, the LDS scorer in GridSearchCV, mislabel AUC."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV

from skattr import TorchModel
from skattr.estimators import GradCosKernel
from skattr.estimators.trak import TRAK
from skattr.metrics import (
    KernelAttribution,
    SubsetRetrainer,
    lds_from_outputs,
    linear_datamodeling_score,
    make_lds_scorer,
    mislabel_detection_auc,
)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    return X[:160], y[:160], X[1000:1030], y[1000:1030]


def _template(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return TorchModel(net, epochs=4, lr=0.1, batch_size=32, random_state=0)


@pytest.fixture(scope="module")
def harness(digits, tmp_path_factory):
    X, y, _, _ = digits
    cache = tmp_path_factory.mktemp("lds")
    return SubsetRetrainer(_template(), n_subsets=8, cache_dir=cache).fit(X, y), cache


@pytest.fixture(scope="module")
def trained(digits):
    X, y, _, _ = digits
    return _template().fit(X, y)


def test_lds_from_outputs_known_cases():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(4, 30))
    masks = rng.random((40, 30)) < 0.5
    additive = masks @ tau.T
    assert lds_from_outputs(tau, masks, 3 * additive - 2) == pytest.approx(1.0)
    assert lds_from_outputs(tau, masks, -additive) == pytest.approx(-1.0)
    lds, per = lds_from_outputs(tau, masks, rng.normal(size=(40, 4)), return_per_sample=True)
    assert per.shape == (4,) and abs(lds) < 0.5
    # a constant output (no variation over subsets) is ignored, not a crash
    Y = additive.copy()
    Y[:, 0] = 1.0
    lds, per = lds_from_outputs(tau, masks, Y, return_per_sample=True)
    assert np.isnan(per[0]) and lds == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same training set"):
        lds_from_outputs(tau[:, :10], masks, additive)
    with pytest.raises(ValueError, match="outputs must have shape"):
        lds_from_outputs(tau, masks, additive.T)


def test_subset_retrainer_is_seeded_and_cached(digits, harness, monkeypatch):
    X, y, Xt, yt = digits
    ret, cache = harness
    assert ret.masks_.shape == (8, 160) and np.all(ret.masks_.sum(1) == 80)
    assert len({m.fingerprint() for m in ret.models_}) == 8
    Y = ret.outputs(Xt, yt)
    assert Y.shape == (8, 30)
    assert ret.outputs(Xt, yt) is Y  # in-memory cache

    # a second harness with the same settings loads models and outputs instead of training
    def no_fit(self, *a, **k):
        raise AssertionError("retrained a cached subset model")

    monkeypatch.setattr(TorchModel, "fit", no_fit)
    again = SubsetRetrainer(_template(seed=1), n_subsets=8, cache_dir=cache).fit(X, y)
    np.testing.assert_array_equal(again.masks_, ret.masks_)
    np.testing.assert_array_equal(again.outputs(Xt, yt), Y)
    assert len(list(next(cache.glob("lds-*")).glob("outputs_*.joblib"))) == 1


def test_lds_of_estimators_and_arrays(digits, harness, trained):
    X, y, Xt, yt = digits
    ret, _ = harness
    trak = TRAK(trained, projection_dim=256, ridge=0.1).fit(X, y)
    lds = linear_datamodeling_score(trak, Xt, yt, retrainer=ret)
    assert lds == pytest.approx(ret.score(trak.attribute(Xt, yt), Xt, yt))
    assert 0.0 < lds <= 1.0  # TRAK predicts subset effects better than chance
    gc = KernelAttribution(GradCosKernel(trained, projection_dim=256, labels="given")).fit(X, y)
    lds_gc, per = ret.score(gc, Xt, yt, return_per_sample=True)
    assert -1 <= lds_gc <= 1 and per.shape == (30,)
    # mismatched training sets are caught
    other = TRAK(trained, projection_dim=64).fit(X[:100], y[:100])
    with pytest.raises(ValueError, match="different training set"):
        linear_datamodeling_score(other, Xt, yt, retrainer=ret)
    with pytest.raises(ValueError, match="cover 100 training examples"):
        ret.score(other.attribute(Xt, yt), Xt, yt)


def test_lds_scorer_in_grid_search(digits, harness, trained):
    X, y, Xt, yt = digits
    ret, _ = harness
    X_all, y_all, cv = ret.search_split(X, y, Xt, yt)
    grid = {"ridge": [1e-3, 1.0], "projection_dim": [64, 256]}
    search = GridSearchCV(TRAK(trained), grid, scoring=make_lds_scorer(ret), cv=cv, refit=False)
    search.fit(X_all, y_all)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and search.best_params_["ridge"] in grid["ridge"]
    i = search.best_index_
    direct = ret.score(TRAK(trained, **search.cv_results_["params"][i]).fit(X, y), Xt, yt)
    assert scores[i] == pytest.approx(direct)
    with pytest.raises(ValueError, match="not the training set"):
        ret.search_split(X[:50], y[:50], Xt, yt)


def test_mislabel_detection_auc(digits):
    assert mislabel_detection_auc([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1]) == 1.0
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_detection_auc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="differ in length"):
        mislabel_detection_auc([0.1, 0.2, 0.3], [False, True])
    # TRAK's self-influence flags flipped labels
    X, y, _, _ = digits
    rng = np.random.default_rng(0)
    flip = rng.random(len(y)) < 0.1
    y_noisy = np.where(flip, (y + rng.integers(1, 10, len(y))) % 10, y)
    model = _template().set_params(epochs=15).fit(X, y_noisy)
    si = TRAK(model, projection_dim=256).fit(X, y_noisy).self_influence()
    assert mislabel_detection_auc(si, flip) > 0.7


def test_lds_of_loss_output_correlates_with_minus_loss():
    """output="loss": attributions of the loss say "positive = lowered it", so the LDS must be
    the one against -loss (a callable computed here), not against the loss (sign flipped)."""
    import torch
    from sklearn.base import clone

    from skattr import TorchModel
    from skattr.estimators import TracIn
    from skattr.metrics import SubsetRetrainer
    from skattr.training import TrajectoryRecorder

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)).astype("float32")
    y = (X @ rng.normal(size=5) + 0.1 * rng.normal(size=80)).astype("float32")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    template = TorchModel(net, task="regression", epochs=15, lr=0.05, random_state=0)
    full = clone(template).set_params(callbacks=[TrajectoryRecorder()]).fit(X[:60], y[:60])
    tr = TracIn(full).fit(X[:60], y[:60])

    def minus_sq(z, t):
        return -((z.reshape(-1) - t.reshape(-1).to(z.dtype)) ** 2)

    kw = dict(n_subsets=6, random_state=0)
    loss = SubsetRetrainer(template, output="loss", **kw).fit(X[:60], y[:60])
    ref = SubsetRetrainer(template, output=minus_sq, **kw).fit(X[:60], y[:60])
    a = loss.score(tr, X[60:], y[60:], return_per_sample=True)[1]
    b = ref.score(tr, X[60:], y[60:], return_per_sample=True)[1]
    assert np.abs(b).max() > 0.1  # not a degenerate case where both signs agree
    np.testing.assert_allclose(a, b, atol=1e-12)
