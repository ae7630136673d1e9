"""LossKernel and the SGLD sampler: closed forms, replay, sklearn integration, bad input."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from joblib import parallel_backend
from sklearn.base import clone
from sklearn.cluster import SpectralClustering
from sklearn.decomposition import KernelPCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from torch import nn

from skattr import TorchModel
from skattr.estimators.loss_kernel import LossKernel
from skattr.sampling import (
    LocalPosterior,
    SamplerDivergenceWarning,
    SGLDSettings,
    StreamingMoments,
    chain_seeds,
    default_nbeta,
    run_chain,
)


# ----------------------------------------------------------------------------- fixtures
def _linear_problem(n=12, d=3, seed=0):
    """Least-squares linear regression: w* is the exact minimiser, so the posterior is Gaussian."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]
    net = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(w_star)[None])
    model = TorchModel(net, task="regression", dtype="float64", device="cpu")
    return X, y, w_star, model


def _ula_gaussian(X, y, w_star, nbeta, gamma, eps):
    """Stationary law of the full-batch SGLD chain (unadjusted Langevin) on the quadratic target.

    Target precision ``A = nbeta X^T X / n + gamma I`` (``L_n`` = mean of ``(x.w - y)^2 / 2``),
    mean ``w*``; the discretised chain ``w <- w - eps/2 A (w - w*) + sqrt(eps) xi`` is Gaussian
    with the same mean and covariance ``(A - eps A^2 / 4)^{-1}`` (-> ``A^{-1}`` as eps -> 0).
    """
    n, d = X.shape
    A = nbeta * X.T @ X / n + gamma * np.eye(d)
    Sigma = np.linalg.inv(A - eps * A @ A / 4)
    return w_star, Sigma


def _loss_covariance(X, y, mu, Sigma):
    """Cov of l_i = r_i^2 / 2, r = X w - y, w ~ N(mu, Sigma): C^2 / 2 + m m^T * C."""
    C = X @ Sigma @ X.T
    m = X @ mu - y
    return 0.5 * C**2 + np.outer(m, m) * C


def _classifier(seed=0, n=60, d=4, n_classes=3, epochs=30):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_classes, d))
    y = np.arange(n) % n_classes
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, n_classes))
    model = TorchModel(net, epochs=epochs, lr=0.1, batch_size=16, random_state=seed,
                       device="cpu").fit(X, y)
    return X, y, model


SMALL = dict(n_chains=2, n_draws=40, burn_in=20, thin=2, step_size=1e-3, localization=100.0)


# ----------------------------------------------------------------------------- correctness
def test_sampler_stationary_law_matches_quadratic_target():
    X, y, w_star, model = _linear_problem()
    # eps * A is large enough for fast mixing; the reference is the exact law of the
    # discretised chain, so no O(eps) bias enters the comparison
    nbeta, gamma, eps = 20.0, 5.0, 0.05
    mu, Sigma = _ula_gaussian(X, y, w_star, nbeta, gamma, eps)
    post = LocalPosterior(model, torch.as_tensor(X), model.encode_y(y, len(y)))
    s = SGLDSettings(step_size=eps, localization=gamma, nbeta=nbeta, n_draws=1000, burn_in=50,
                     thin=1, batch_size=len(X)).validate()
    draws = np.vstack([
        run_chain(post, s, seed, keep_draws=True).draws for seed in chain_seeds(0, 2)
    ]).astype(np.float64)
    emp_mean, emp_cov = draws.mean(0), np.cov(draws.T)
    sd = np.sqrt(np.diag(Sigma))
    assert np.all(np.abs(emp_mean - mu) < 0.15 * sd)
    rel = np.linalg.norm(emp_cov - Sigma) / np.linalg.norm(Sigma)
    assert rel < 0.15, rel


def test_covariance_converges_to_closed_form_as_draws_grow():
    X, y, w_star, model = _linear_problem(n=10)
    nbeta, gamma, eps = 20.0, 5.0, 0.05
    mu, Sigma = _ula_gaussian(X, y, w_star, nbeta, gamma, eps)
    K_true = _loss_covariance(X, y, mu, Sigma)
    errs = []
    for n_draws in (50, 1200):
        lk = LossKernel(model, kind="covariance", n_chains=2, n_draws=n_draws, burn_in=50,
                        thin=1, step_size=eps, localization=gamma, nbeta=nbeta,
                        batch_size=len(X), keep=None, random_state=1).fit(X, y)
        errs.append(np.linalg.norm(lk.kernel_ - K_true) / np.linalg.norm(K_true))
        np.testing.assert_allclose(lk.variance_, np.diag(lk.kernel_))
    assert errs[1] < errs[0], errs
    assert errs[1] < 0.2, errs


def test_streaming_moments_match_numpy_and_merge():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(157, 9)) + rng.normal(size=9)
    B = rng.normal(size=(157, 4)) + A[:, :4]
    s1, s2 = StreamingMoments(9, block=5), StreamingMoments(9, block=64)
    x1, x2 = StreamingMoments(9, 4, block=7), StreamingMoments(9, 4, block=3)
    for t in range(157):
        (s1 if t < 70 else s2).update(A[t])
        (x1 if t < 100 else x2).update(A[t], B[t])
    s1.merge(s2)
    x1.merge(x2)
    full = np.cov(np.hstack([A, B]).T)
    np.testing.assert_allclose(s1.mean_a, A.mean(0), atol=1e-12)
    np.testing.assert_allclose(s1.variances(), np.diag(full)[:9], atol=1e-12)
    np.testing.assert_allclose(s1.covariance(), full[:9, :9], atol=1e-12)
    np.testing.assert_allclose(x1.covariance(), full[:9, 9:], atol=1e-12)
    va, vb = x1.variances()
    np.testing.assert_allclose(vb, np.diag(full)[9:], atol=1e-12)
    np.testing.assert_allclose(s1.covariance(inplace=True), full[:9, :9], atol=1e-12)
    with pytest.raises(RuntimeError, match="consumed"):
        s1.covariance()


def test_default_nbeta_and_settings_validation():
    assert default_nbeta(256) == pytest.approx(256 / np.log(256))
    with pytest.raises(ValueError, match="step_size"):
        SGLDSettings(step_size=float("nan")).validate()
    with pytest.raises(ValueError, match="localization"):
        SGLDSettings(localization=-1.0).validate()


# ----------------------------------------------------------------------------- kernel API
def test_fit_attributes_and_correlation_diagonal():
    X, y, model = _classifier()
    lk = LossKernel(model, **SMALL, random_state=0).fit(X, y)
    n = len(X)
    assert lk.kernel_.shape == (n, n)
    np.testing.assert_allclose(lk.kernel_, lk.kernel_.T)
    assert np.all(lk.variance_ > 0)  # float64 losses: even confident examples vary
    np.testing.assert_allclose(np.diag(lk.kernel_), 1.0)
    assert np.all(np.abs(lk.kernel_) <= 1.0)
    assert lk.loss_traces_.shape == (2, 20 + 40 * 2)
    assert lk.draw_losses_.shape == (2, 40)
    assert lk.n_draws_used_ == 80
    assert not lk.diverged_.any()
    assert np.isfinite(lk.loss_traces_).all()
    assert lk.nbeta_ == pytest.approx(default_nbeta(n))  # batch capped at n
    # same-class examples are more correlated than different-class ones
    same = y[:, None] == y[None, :]
    off = ~np.eye(n, dtype=bool)
    assert lk.kernel_[same & off].mean() > lk.kernel_[~same].mean()


def test_reproducible_and_independent_of_n_jobs():
    X, y, model = _classifier()
    a = LossKernel(model, **SMALL, random_state=3).fit(X, y)
    b = LossKernel(model, **SMALL, random_state=3).fit(X, y)
    np.testing.assert_array_equal(a.kernel_, b.kernel_)
    # the parallel path (one accumulator per chain, merged as chains finish); threads keep the
    # test fast, the default process backend runs the same code in worker processes
    with parallel_backend("threading"):
        c = LossKernel(model, **SMALL, random_state=3, n_jobs=2).fit(X, y)
    np.testing.assert_allclose(c.kernel_, a.kernel_, atol=1e-6)
    np.testing.assert_array_equal(c.loss_traces_, a.loss_traces_)
    d = LossKernel(model, **SMALL, random_state=4).fit(X, y)
    assert not np.allclose(d.kernel_, a.kernel_)


@pytest.mark.parametrize("kind", ["correlation", "covariance"])
def test_transform_replays_the_fitted_draws(kind):
    X, y, model = _classifier()
    lk = LossKernel(model, **SMALL, kind=kind, random_state=0).fit(X, y)
    K = lk.transform(X, y)  # the fitted points against themselves, same labels
    np.testing.assert_allclose(K, lk.kernel_, atol=1e-8)
    Kd = LossKernel(model, **SMALL, kind=kind, keep="draws", random_state=0).fit(X, y)
    np.testing.assert_allclose(Kd.kernel_, lk.kernel_, atol=1e-10)
    np.testing.assert_allclose(Kd.transform(X[:7], y[:7]), K[:7], atol=1e-5)
    # default labels: the network's predictions
    pred = model.predict(X[:7])
    np.testing.assert_allclose(lk.transform(X[:7]), lk.transform(X[:7], pred), atol=1e-12)
    assert lk.fit_transform(X, y).shape == (len(X), len(X))


def test_sklearn_integration_clustering_kpca_pipeline_clone():
    X, y, model = _classifier(n=90)
    lk = LossKernel(model, **SMALL, random_state=0)
    K = lk.fit_transform(X, y)
    # a non-negative affinity from the correlation kernel
    labels = SpectralClustering(3, affinity="precomputed", random_state=0).fit_predict((1 + K) / 2)
    assert adjusted_rand_score(y, labels) > 0.7
    Z = KernelPCA(2, kernel="precomputed").fit_transform(K)
    assert Z.shape == (90, 2) and np.isfinite(Z).all()
    pipe = make_pipeline(LossKernel(model, **SMALL, random_state=0), SVC(kernel="precomputed"))
    pipe.fit(X[:60], y[:60])
    assert pipe.score(X[60:], y[60:]) > 0.8
    # clone keeps the trained network and the parameters
    c = clone(lk)
    assert c.get_params()["n_draws"] == 40
    w0 = next(model.module_.parameters()).detach()
    assert torch.equal(next(c.model.module_.parameters()).detach(), w0)
    # pickling a fitted kernel keeps it usable
    lk2 = pickle.loads(pickle.dumps(lk))
    np.testing.assert_allclose(lk2.kernel_, lk.kernel_)


def test_fit_on_probe_with_separate_sampling_data():
    X, y, model = _classifier(n=90)
    lk = LossKernel(model, **SMALL, random_state=0).fit(X[:20], y[:20], X_sample=X, y_sample=y)
    assert lk.kernel_.shape == (20, 20)
    with pytest.raises(ValueError, match="y_sample was given without X_sample"):
        LossKernel(model, **SMALL).fit(X, y, y_sample=y)


# ----------------------------------------------------------------------------- bad input
def test_diverging_step_size_raises_with_advice():
    X, y, model = _classifier()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match="Lower step_size"):
            LossKernel(model, **{**SMALL, "step_size": 5.0, "localization": 0.0},
                       nbeta=1e6).fit(X, y)
    assert any(issubclass(w.category, SamplerDivergenceWarning) for w in rec)


def test_chain_far_above_start_warns_but_is_kept():
    X, y, model = _classifier()
    with pytest.warns(SamplerDivergenceWarning, match="far above the starting loss"):
        lk = LossKernel(model, **{**SMALL, "step_size": 0.05, "localization": 0.0},
                        nbeta=1.0).fit(X, y)
    assert lk.far_.any() and not lk.diverged_.any()
    assert np.isfinite(lk.kernel_).all()


def test_some_chains_diverging_are_dropped():
    X, y, model = _classifier()
    post = LocalPosterior(model, model.to_tensor(X), model.encode_y(y, len(y)))
    s = SGLDSettings(step_size=5.0, localization=0.0, nbeta=1e6, n_draws=5, burn_in=2,
                     batch_size=16)
    r = run_chain(post, s, 0, probes=[(post.X, post.y)])
    assert r.failed and "step" in r.message
    assert r.n_draws_done < 5


def test_failed_chain_is_removed_from_the_shared_accumulator(monkeypatch):
    from skattr import sampling

    X, y, model = _classifier()
    post = LocalPosterior(model, model.to_tensor(X), model.encode_y(y, len(y)))
    s = SGLDSettings(step_size=1e-3, localization=100.0, nbeta=10.0, n_draws=20, burn_in=5,
                     batch_size=16)
    seeds = chain_seeds(0, 3)
    real = sampling.run_chain
    seen = []

    def flaky(post, settings, seed, **kw):
        r = real(post, settings, seed, **kw)
        if seed == seeds[1] and seed not in seen:  # fails the first time only
            seen.append(seed)
            r.failed, r.message = True, "chain 1: injected failure"
        return r

    monkeypatch.setattr(sampling, "run_chain", flaky)
    make = lambda: StreamingMoments(len(X))  # noqa: E731
    with pytest.warns(SamplerDivergenceWarning, match="injected"):
        res = sampling.sample(post, s, seeds, probes=[(post.X, post.y)], make_observer=make)
    assert res.failed.tolist() == [False, True, False] and res.n_draws_used == 40
    ref = sampling.sample(post, s, [seeds[0], seeds[2]], probes=[(post.X, post.y)],
                          make_observer=make)
    np.testing.assert_allclose(res.observer.covariance(), ref.observer.covariance(), atol=1e-12)


def test_localisation_overshoot_is_an_error():
    X, y, model = _classifier()
    with pytest.raises(ValueError, match="overshoots"):
        LossKernel(model, **{**SMALL, "step_size": 0.1, "localization": 100.0}).fit(X, y)


def test_nan_losses_are_a_clear_error():
    X, y, model = _classifier()
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.module_[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        LossKernel(bad, **SMALL).fit(X, y)


def test_labels_not_matching_the_model_classes():
    X, y, model = _classifier()
    y_bad = y.copy()
    y_bad[0] = 7
    with pytest.raises(ValueError, match="not among the model's classes"):
        LossKernel(model, **SMALL).fit(X, y_bad)
    lk = LossKernel(model, **SMALL).fit(X, y)
    with pytest.raises(ValueError, match="not among the model's classes"):
        lk.transform(X[:3], np.array([0, 1, 9]))
    with pytest.raises(ValueError, match="cannot be matched|not among"):
        LossKernel(model, **SMALL).fit(X, np.array(["a"] * len(X)))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        LossKernel(model, **SMALL).fit(X, y[:-1])


def test_regression_targets_must_match_outputs():
    X, y, w_star, model = _linear_problem()
    with pytest.raises(ValueError, match="target column"):
        LossKernel(model, **SMALL).fit(X, np.c_[y, y])


def test_other_bad_input():
    X, y, model = _classifier()
    with pytest.raises(TypeError, match="TorchModel"):
        LossKernel(torch.nn.Linear(4, 3)).fit(X, y)
    with pytest.raises(ValueError, match="step_size"):
        LossKernel(model, step_size=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="kind"):
        LossKernel(model, kind="cosine").fit(X, y)
    lk = LossKernel(model, **SMALL, keep=None).fit(X, y)
    with pytest.raises(ValueError, match="keep=None"):
        lk.transform(X)
    with pytest.raises(ValueError, match="features"):
        LossKernel(model, **SMALL).fit(X, y).transform(X[:, :3])
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LossKernel(model, **SMALL).fit(Xn, y)


# ----------------------------------------------------------------------------- self-checks
# (issue 10, item 9) the defaults choose the step size and thinning themselves and report how
# trustworthy the kernel is.
def _subspace_multitask(seed=0, n=300):
    """A small 3-task problem built unlike make_multitask (Gaussian subspaces, no task code)."""
    from skattr.datasets import make_multitask_subspaces
    from skattr.reports.loss_kernel import train_mlp

    X, y, task = make_multitask_subspaces(n, random_state=seed)
    return X, y, task, train_mlp(X, y, 6, epochs=60, width=64, seed=seed)


def test_defaults_separate_tasks_on_a_multitask_set_they_were_not_tuned_on():
    from skattr.reports.loss_kernel import cluster_ari

    X, y, task, model = _subspace_multitask()
    assert model.score(X, y) > 0.95
    lk = LossKernel(model, random_state=0).fit(X, y)  # every sampler setting at its default
    ari, _ = cluster_ari(np.abs(lk.kernel_), task, 3)
    assert ari >= 0.95, (ari, lk.step_size_, lk.thin_)
    same = task[:, None] == task[None, :]
    off = ~np.eye(len(X), dtype=bool)
    # the theory's block structure: within-task |K| well above the across-task level
    assert np.abs(lk.kernel_[same & off]).mean() > 3 * np.abs(lk.kernel_[~same]).mean()


def test_diagnostics_are_present_and_sensible():
    X, y, model = _classifier()
    lk = LossKernel(model, n_chains=3, n_draws=100, random_state=0).fit(X, y)
    cal = lk.calibration_
    assert cal.accepted and lk.step_size_ in cal.step_sizes
    assert lk.step_size_ * lk.localization / 2 < 1
    # the chosen rung's plateau differs from the next smaller rung's by <= tol of the rise
    k = int(np.flatnonzero(cal.step_sizes == lk.step_size_)[0])
    lv = cal.levels
    assert abs(lv[k] - lv[k + 1]) <= 0.05 * abs(lv[k + 1] - cal.init_loss)
    assert lv[k + 1] > cal.init_loss  # the chain moved: the loss rose above the start
    assert lk.thin_ == min(20, int(np.ceil(1.2 / (lk.step_size_ * lk.localization))))
    assert lk.loss_traces_.shape == (3, lk.burn_in + 100 * lk.thin_)
    assert lk.ess_.shape == lk.rhat_.shape == (3,)
    assert np.all((lk.ess_ > 10) & (lk.ess_ <= 100 * np.log10(100)))
    assert np.all(np.abs(lk.rhat_ - 1) < 0.1) and abs(lk.rhat_pooled_ - 1) < 0.1
    assert 0.5 < lk.split_half_reliability_ <= 1
    assert len(lk.diagnostic_points_) == len(X)  # fewer than 128 points: all tracked


def test_a_broken_run_warns_that_noise_dominates():
    from skattr.sampling import SamplerDiagnosticWarning

    X, y, model = _classifier()
    healthy = LossKernel(model, n_chains=2, n_draws=120, random_state=0).fit(X, y)
    with pytest.warns(SamplerDiagnosticWarning, match="too few effective draws") as rec:
        broken = LossKernel(model, n_chains=2, n_draws=120, thin=1, random_state=0,
                            step_size=healthy.step_size_ / 100).fit(X, y)
    assert "ess_" in str(rec[0].message)
    # a fixed step is told about 'auto'; a run that used 'auto' is not told to use it
    assert "Use step_size='auto'" in str(rec[0].message)
    with pytest.warns(SamplerDiagnosticWarning) as rec_auto:
        LossKernel(model, n_chains=2, n_draws=10, thin=1, random_state=0).fit(X, y)
    assert rec_auto and not any("Use step_size='auto'" in str(w.message) for w in rec_auto)
    assert broken.ess_.sum() < 100 < healthy.ess_.sum()
    assert broken.split_half_reliability_ < healthy.split_half_reliability_
    # a step 100x too large is refused outright (the localisation term overshoots w*)
    with pytest.raises(ValueError, match="overshoots"):
        LossKernel(model, n_chains=2, n_draws=60, step_size=healthy.step_size_ * 100).fit(X, y)


def test_auto_defaults_are_deterministic_clonable_and_picklable():
    X, y, model = _classifier()
    kw = dict(n_chains=2, n_draws=30, burn_in=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # few draws: warned, not tested here
        a = LossKernel(model, **kw, random_state=0).fit(X, y)
        b = LossKernel(model, **kw, random_state=0).fit(X, y)
        with parallel_backend("threading"):
            c = LossKernel(model, **kw, random_state=0, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(a.kernel_, b.kernel_)
    assert a.step_size_ == b.step_size_ and a.split_half_reliability_ == b.split_half_reliability_
    assert c.step_size_ == a.step_size_ and c.thin_ == a.thin_
    np.testing.assert_allclose(c.kernel_, a.kernel_, atol=1e-12)
    np.testing.assert_array_equal(c.ess_, a.ess_)
    cl = clone(a)
    assert cl.get_params()["step_size"] == "auto" and cl.get_params()["thin"] == "auto"
    a2 = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a2.kernel_, a.kernel_)
    assert a2.step_size_ == a.step_size_ and a2.calibration_.accepted == a.calibration_.accepted
    # transform replays the fitted draws (same calibrated step) after pickling
    np.testing.assert_allclose(a2.transform(X[:5], y[:5]), a.kernel_[:5], atol=1e-8)


def test_ess_rhat_and_reliability_on_known_series():
    from skattr.sampling import effective_sample_size, split_half_reliability, split_rhat

    rng = np.random.default_rng(0)
    iid = rng.normal(size=(2000, 3))
    assert np.all(np.abs(effective_sample_size(iid) / 2000 - 1) < 0.15)
    ar = np.zeros(4000)
    for t in range(1, ar.size):
        ar[t] = 0.9 * ar[t - 1] + rng.normal()
    # AR(1): ESS = n (1 - rho) / (1 + rho)
    assert effective_sample_size(ar) == pytest.approx(4000 * 0.1 / 1.9, rel=0.3)
    assert abs(split_rhat(rng.normal(size=(4, 500))) - 1) < 0.02
    assert split_rhat(np.cumsum(rng.normal(size=(2, 500)), 1)) > 1.1  # random walks drift
    # reliability: a shared low-rank structure is reproduced by both halves, noise is not
    z = rng.normal(size=(1, 400, 3))
    signal = np.repeat(z, 10, axis=2) + 0.3 * rng.normal(size=(1, 400, 30))
    assert split_half_reliability(signal) > 0.9
    assert abs(split_half_reliability(rng.normal(size=(1, 400, 30)))) < 0.2
