"""scikit-learn compatibility: the estimator checks, pipelines, GridSearchCV, clone, pickle, caches."""

import copy
import pickle

import joblib
import numpy as np
import pytest
import torch
from conftest import make_cnn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skattr import TorchModel
from skattr.cache import FeatureCache
from skattr.estimators import (
    EmbeddingKernel,
    EmpiricalNTK,
    GradCosKernel,
    PseudoNTK,
    TraceNTK,
)
from skattr.surrogates import KernelSurrogate, make_fidelity_scorer


# ----------------------------------------------------------------------------- estimator checks
def _lazy_model(**kw):
    """A float64 TorchModel whose first layer is lazy, so any n_features works.

    Unfitted, it is used as is: the lazy layer is materialised deterministically from
    ``random_state`` on the first input (the rest of the weights are fixed at construction).
    """
    net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    params = dict(dtype="float64", random_state=0, epochs=3, batch_size=16, lr=0.1)
    params.update(kw)
    return TorchModel(net, **params)


def _check_estimators():
    torch.manual_seed(0)  # the non-lazy weights: fixed so that every run checks the same network
    return [
        _lazy_model(),
        TraceNTK(_lazy_model()),
        TraceNTK(_lazy_model(), projection_dim=16),
        PseudoNTK(_lazy_model(), projection_dim=16, projection="sparse", normalize=False),
        EmpiricalNTK(_lazy_model()),
        GradCosKernel(_lazy_model()),
        EmbeddingKernel(_lazy_model()),
        KernelSurrogate(PseudoNTK(_lazy_model(), projection_dim=16), "krr"),
    ]


_TORCH_HASH = (
    "joblib.hash of a torch tensor pickles its storage key, which is the storage's memory "
    "address, so the check's deep copy of the module hashes differently although fit leaves it "
    "untouched (test_fit_does_not_mutate_the_module checks that directly)."
)
_FIXED_CLASSES = {
    "check_dtype_object": "the check's y has 4 classes; a network with 3 logits has 3 classes "
    "(labels are indices of its logits).",
    "check_classifiers_classes": "string labels ('one', 'two') are not indices of the "
    "network's 3 logits: a clear ValueError naming the labels and the model's classes.",
    "check_classifiers_train": "on the check's binary problem a 3-logit network is still a "
    "3-class classifier, so decision_function has 3 columns where the check expects 1-D.",
    "check_decision_proba_consistency": "binary problem, 3-logit network: decision_function is "
    "(n, 3), not the 1-D binary decision the check ranks against predict_proba[:, 1].",
}


def _expected_failures(est):
    xf = {"check_estimators_overwrite_params": _TORCH_HASH}
    if isinstance(est, TorchModel):
        xf.update(_FIXED_CLASSES)
    if isinstance(est, EmpiricalNTK):
        reason = (
            "output='flat' has one row per (sample, class) pair, n_samples * C rows, as "
            "KernelRidge on the vector-valued kernel needs; the checks expect n_samples rows."
        )
        for name in ("check_transformer_data_not_an_array", "check_transformer_general",
                     "check_methods_sample_order_invariance"):
            xf[name] = reason
    if isinstance(est, GradCosKernel):
        xf["check_dtype_object"] = (
            "the check's y has 4 labels; the loss of a 3-logit network is defined for labels "
            "0..2 only, so fit raises a ValueError naming the labels."
        )
    return xf


@parametrize_with_checks(_check_estimators(), expected_failed_checks=_expected_failures,
                         xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


_KGLM_PROBA = (
    "the kGLM is sklearn's SGDClassifier(loss='log_loss') with the paper's small alpha=1e-4 on "
    "kernel features: decision values reach tens to hundreds, where its one-vs-rest "
    "predict_proba saturates (sigmoid(37) == sigmoid(58) == 1.0 in float64), so "
    "argmax(predict_proba) can tie and differ from predict on a few points. Whether it happens "
    "depends on the network's weights, hence a non-strict xfail."
)


def _kglm_estimators():
    torch.manual_seed(0)
    return [KernelSurrogate(TraceNTK(_lazy_model()))]


def _kglm_expected_failures(est):
    return {"check_estimators_overwrite_params": _TORCH_HASH, "check_classifiers_train": _KGLM_PROBA}


@parametrize_with_checks(_kglm_estimators(), expected_failed_checks=_kglm_expected_failures,
                         xfail_strict=False)
def test_sklearn_estimator_checks_kglm_surrogate(estimator, check):
    check(estimator)


def test_fit_does_not_mutate_the_module():
    """What check_estimators_overwrite_params cannot see through torch's hashing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    X = np.random.RandomState(0).randn(30, 5)
    y = np.arange(30) % 3
    model = TorchModel(net, dtype="float64", epochs=2, random_state=0)
    model.fit(X, y)
    TraceNTK(model).fit(X)
    KernelSurrogate(TraceNTK(TorchModel(net)), "svc").fit(X.astype(np.float32))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert v.dtype == torch.float32
    # a lazy module is not materialised by kernels fitted on it
    lazy = _lazy_model()
    TraceNTK(lazy).fit(X)
    assert isinstance(lazy.module[0], nn.LazyLinear)


# ----------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def trained():
    """A small trained classifier on 3 separable blobs, float32."""
    rng = np.random.RandomState(0)
    centers = rng.randn(3, 6) * 2
    y = np.repeat(np.arange(3), 30)
    X = (centers[y] + rng.randn(90, 6)).astype(np.float32)
    perm = rng.permutation(90)
    X, y = X[perm], y[perm]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    model = TorchModel(net, epochs=10, batch_size=16, lr=0.05, random_state=0).fit(X, y)
    assert model.score(X, y) > 0.8
    return model, X, y


# ----------------------------------------------------------------------------- pipelines
def test_pipeline_in_gridsearch_with_fidelity_scorer(trained):
    model, X, y = trained
    cache = FeatureCache()
    pipe = make_pipeline(TraceNTK(model, projection_dim=256, memory=cache), SVC(kernel="precomputed"))
    search = GridSearchCV(pipe, {"tracentk__projection_dim": [16, 64, 256]}, cv=3,
                          scoring=make_fidelity_scorer(model))
    search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 3 and np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 1)
    assert search.best_params_["tracentk__projection_dim"] in (16, 64, 256)
    # one featurisation serves the whole grid: every sample was featurised once
    assert cache.misses == len(X)
    assert cache.hits > 0
    # the refitted best pipeline scores test points against the full training set
    K = search.best_estimator_[0].transform(X[:5])
    assert K.shape == (5, len(X))


def test_pipeline_slices_train_and_test_blocks_correctly(trained):
    """Under CV, the pipeline's predictions equal an SVC on slices of the full kernel matrix."""
    model, X, y = trained
    Kfull = TraceNTK(model).fit(X).transform(X)
    pipe = make_pipeline(TraceNTK(model), SVC(kernel="precomputed", C=10.0))
    for train, test in KFold(3, shuffle=True, random_state=0).split(X):
        pred = clone(pipe).fit(X[train], y[train]).predict(X[test])
        svc = SVC(kernel="precomputed", C=10.0).fit(Kfull[np.ix_(train, train)], y[train])
        np.testing.assert_array_equal(pred, svc.predict(Kfull[np.ix_(test, train)]))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.mean() > 0.8


# ----------------------------------------------------------------------------- clone / pickle
def _fitted(model, X, y):
    return [
        TraceNTK(model).fit(X),
        TraceNTK(model, projection_dim=32).fit(X),
        PseudoNTK(model, projection_dim=32, projection="sparse").fit(X),
        EmpiricalNTK(model).fit(X[:20]),
        GradCosKernel(model).fit(X, y),
        GradCosKernel(model, projection_dim=32, projection="gaussian").fit(X, y),
        EmbeddingKernel(model).fit(X),
        TraceNTK(model, projection_dim=32, memory=FeatureCache()).fit(X),
        KernelSurrogate(TraceNTK(model)).fit(X),
        KernelSurrogate(PseudoNTK(model, projection_dim=32), "krr").fit(X),
        model,
    ]


def _outputs(est, X):
    if isinstance(est, (KernelSurrogate, TorchModel)):
        return est.predict(X), est.decision_function(X)
    return (est.transform(X),)


def test_clone_keeps_the_network_and_refits_identically(trained):
    model, X, y = trained
    for est in _fitted(model, X, y):
        c = clone(est)
        if isinstance(est, TorchModel):
            # a fitted TorchModel's clone retrains from the same random_state: same weights
            c.fit(X, y)
        elif isinstance(est, GradCosKernel):
            c.fit(X, y)
        elif isinstance(est, EmpiricalNTK):
            c.fit(X[:20])
        else:
            c.fit(X)
        for a, b in zip(_outputs(est, X[:7]), _outputs(c, X[:7])):
            np.testing.assert_array_equal(a, b)


def test_pickle_and_joblib_round_trips(trained, tmp_path):
    model, X, y = trained
    for i, est in enumerate(_fitted(model, X, y)):
        ref = _outputs(est, X[:7])
        est2 = pickle.loads(pickle.dumps(est))
        path = tmp_path / f"est{i}.joblib"
        joblib.dump(est, path)
        est3 = joblib.load(path)
        for other in (est2, est3, copy.deepcopy(est)):
            for a, b in zip(ref, _outputs(other, X[:7])):
                if getattr(est, "memory", None) is not None:
                    # a pickled cache is empty: features are recomputed for these 7 samples
                    # alone, which may differ from the cached batch in float32 rounding
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
                else:
                    np.testing.assert_array_equal(a, b)


def test_unfitted_torchmodel_clone_keeps_pretrained_weights():
    net = make_cnn(dtype=torch.float32)
    X = np.random.RandomState(0).randn(4, 2, 6, 6).astype(np.float32)
    model = TorchModel(net)
    c = clone(model)
    np.testing.assert_array_equal(model.decision_function(X), c.decision_function(X))
    assert c.module is not model.module


# ----------------------------------------------------------------------------- FeatureCache
@pytest.mark.parametrize("cls", [TraceNTK, PseudoNTK, GradCosKernel, EmpiricalNTK])
def test_feature_cache_gives_identical_kernels(trained, cls):
    model, X, y = trained
    cache = FeatureCache()
    kw = {"output": "blocks"} if cls is EmpiricalNTK else ({"labels": "given"} if cls is GradCosKernel else {})
    fit_args = (X[:40], y[:40]) if cls is GradCosKernel else (X[:40],)
    for k in (32, 96, 16):  # 96 extends the cached rows, 16 slices them
        plain = cls(model, projection_dim=k, **kw).fit(*fit_args).transform(X[30:60])
        cached = cls(model, projection_dim=k, memory=cache, **kw).fit(*fit_args).transform(X[30:60])
        np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    # 60 distinct samples (fit 0:40 and transform 30:60 share 10), each featurised once;
    # Grad-Cos keys a sample by its label too: fit uses y, transform the network's prediction
    n_distinct = 60
    if cls is GradCosKernel:
        pred = model.predict(X[30:40])
        n_distinct += int((pred != y[30:40]).sum())
    assert cache.misses == n_distinct


def test_feature_cache_rows_are_not_scaled_in_place(trained):
    """Features handed out as a view of the cache (the cached rows, in order) are copied before
    scaling, and gathered ones are scaled in place: repeated fits and transforms agree with
    the uncached estimator, and gather=False + take equals get."""
    model, X, y = trained
    cache = FeatureCache()
    plain = TraceNTK(model, projection_dim=32).fit(X[:40])
    for _ in range(3):  # fit on the cached rows in order (a view), then on a permutation
        est = TraceNTK(model, projection_dim=32, memory=cache).fit(X[:40])
        torch.testing.assert_close(est.features_, plain.features_, rtol=1e-6, atol=1e-7)
        perm = TraceNTK(model, projection_dim=32, memory=cache).fit(X[:40][::-1].copy())
        torch.testing.assert_close(perm.features_, plain.features_.flip(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(est.transform(X[:40]), plain.transform(X[:40]), rtol=1e-5, atol=1e-6)
    key = est._cache_key()
    Xt = model.to_tensor(X[5:25])
    F, h = cache.get(key, Xt, 32, None, return_hashes=True)
    none, h2 = cache.get(key, Xt, 32, None, return_hashes=True, gather=False)
    assert none is None and h2 == h
    torch.testing.assert_close(cache.take(key, h, 32), F, rtol=0, atol=0)


def test_lazy_fit_features_from_the_cache(trained):
    """With a cache, a trace kernel's fit set features are gathered only when needed; they
    equal the uncached ones, travel in a pickle, and survive the cache being cleared."""
    model, X, y = trained
    plain = TraceNTK(model, projection_dim=32).fit(X[:40])
    cache = FeatureCache()
    est = TraceNTK(model, projection_dim=32, memory=cache).fit(X[:40])
    assert est._feats is None  # not gathered by fit
    torch.testing.assert_close(est.fit_diag_, plain.fit_diag_, rtol=1e-5, atol=1e-7)
    est2 = pickle.loads(pickle.dumps(est))  # materialised for the pickle
    torch.testing.assert_close(est2.features_, plain.features_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(est2.transform(X[50:60]), plain.transform(X[50:60]), rtol=1e-5, atol=1e-6)
    # the fitted estimator keeps views of the cached blocks: clearing or swapping the cache,
    # or changing parameters, does not lose its features
    for change in ("clear", "none", "new"):
        lazy = TraceNTK(model, projection_dim=32, memory=cache).fit(X[:40][::-1].copy())
        if change == "clear":
            cache.clear()
        else:
            lazy.set_params(memory=None if change == "none" else FeatureCache())
        assert hasattr(lazy, "features_")
        np.testing.assert_allclose(lazy.transform(X[50:60]), plain.transform(X[50:60])[:, ::-1],
                                   rtol=1e-5, atol=1e-6)
        pickle.dumps(lazy)


def test_lazy_features_only_for_a_large_part_of_the_cache(trained):
    """Views of the cache are kept only when the fit rows are at least half of the cached rows;
    a small fit set is gathered at fit (its views would keep far more memory alive)."""
    model, X, y = trained
    cache = FeatureCache()
    TraceNTK(model, projection_dim=16, memory=cache).fit(X)  # caches every row
    small = TraceNTK(model, projection_dim=16, memory=cache).fit(X[:10])
    assert small._feats is not None and small._feats_src is None
    plain = TraceNTK(model, projection_dim=16).fit(X[:10])
    torch.testing.assert_close(small.features_, plain.features_, rtol=1e-6, atol=1e-7)


def test_feature_cache_survives_concurrent_clear(trained):
    """One thread clears the cache while another fits and transforms through it: no error,
    and the kernels equal the uncached ones."""
    import threading

    model, X, y = trained
    cache = FeatureCache()
    ref = TraceNTK(model, projection_dim=16).fit(X[:30]).transform(X[20:50])
    stop, errors = threading.Event(), []

    def clearer():
        while not stop.is_set():
            cache.clear()

    t = threading.Thread(target=clearer)
    t.start()
    try:
        for _ in range(25):
            try:
                K = TraceNTK(model, projection_dim=16, memory=cache).fit(X[:30]).transform(X[20:50])
                np.testing.assert_allclose(K, ref, rtol=1e-5, atol=1e-6)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]


def test_feature_cache_hit_across_clones_and_folds(trained):
    model, X, y = trained
    cache = FeatureCache()
    pipe = make_pipeline(TraceNTK(model, projection_dim=64, memory=cache), SVC(kernel="precomputed"))
    s1 = cross_val_score(pipe, X, y, cv=3)
    assert cache.misses == len(X)
    hits = cache.hits
    s2 = cross_val_score(clone(pipe), X, y, cv=3)
    np.testing.assert_array_equal(s1, s2)
    assert cache.misses == len(X)  # nothing recomputed for the clone: every lookup hits
    assert cache.hits == hits + (hits + len(X))
    # a different model (other weights) does not hit the first model's entries
    other = TorchModel(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    TraceNTK(other, projection_dim=64, memory=cache).fit(X[:10])
    assert cache.misses == len(X) + 10


def test_feature_cache_pickles_empty_and_respects_max_bytes(trained):
    model, X, y = trained
    cache = FeatureCache()
    est = TraceNTK(model, projection_dim=16, memory=cache).fit(X)
    est2 = pickle.loads(pickle.dumps(est))
    assert est2.memory is not cache and est2.memory.nbytes() == 0
    np.testing.assert_allclose(est2.transform(X[:3]), est.transform(X[:3]), rtol=1e-5, atol=1e-6)
    assert copy.deepcopy(cache) is cache
    small = FeatureCache(max_bytes=1000)
    with pytest.raises(MemoryError, match="max_bytes=1000"):
        TraceNTK(model, projection_dim=64, memory=small).fit(X)


def test_feature_cache_gram_serves_sizes_and_folds(trained):
    """The cached Gram (one per size, grown by nested prefix sums and by new samples) equals the
    kernel computed from features, in any order of sizes and for overlapping sample sets."""
    model, X, y = trained
    cache = FeatureCache()
    for k, (f0, f1), (t0, t1) in [(32, (0, 40), (30, 60)), (64, (0, 60), (50, 90)),
                                  (16, (20, 90), (0, 30)), (48, (0, 90), (0, 90))]:
        plain = TraceNTK(model, projection_dim=k).fit(X[f0:f1]).transform(X[t0:t1])
        est = TraceNTK(model, projection_dim=k, memory=cache).fit(X[f0:f1])
        np.testing.assert_allclose(est.transform(X[t0:t1]), plain, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(est.diagonal(X[t0:t1]), np.ones(t1 - t0), rtol=1e-6)
    assert cache.gram_nbytes() == 4 * 90 * 90 * 4  # sizes 16, 32, 48, 64 over all 90 samples
    # a bound of 0 bytes keeps no Gram and gives the same kernel from the features
    none = FeatureCache(max_gram_bytes=0)
    K0 = TraceNTK(model, projection_dim=48, memory=none).fit(X[:50]).transform(X[40:])
    np.testing.assert_allclose(K0, TraceNTK(model, projection_dim=48).fit(X[:50]).transform(X[40:]),
                               rtol=1e-5, atol=1e-6)
    assert none.gram_nbytes() == 0


@pytest.mark.parametrize("projection_dim", [None, 32])
@pytest.mark.parametrize("cls", [TraceNTK, PseudoNTK, GradCosKernel, EmpiricalNTK])
def test_fit_transform_equals_fit_then_transform(trained, cls, projection_dim):
    model, X, y = trained
    for kw in ({"output": "blocks"}, {"output": "flat"}) if cls is EmpiricalNTK else ({},):
        est = cls(model, projection_dim=projection_dim, **kw)
        for fit_y in (None, y) if cls is GradCosKernel else (None,):
            # Grad-Cos fitted with labels y uses them for the fit set only: fit_transform must
            # still equal fit(X, y).transform(X), which takes the network's predictions
            np.testing.assert_allclose(est.fit_transform(X, fit_y),
                                       clone(est).fit(X, fit_y).transform(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [TraceNTK, EmpiricalNTK])
def test_exact_fit_kernel_mirrors_blocks(trained, cls):
    """The exact fit-set kernel over several record chunks computes the blocks above the
    diagonal and mirrors them: it equals fit(X).transform(X), chunk by chunk."""
    model, X, y = trained
    kw = {"output": "blocks"} if cls is EmpiricalNTK else {}
    est = cls(model, batch_size=7, **kw)
    K = est.fit_transform(X[:30])
    np.testing.assert_allclose(K, clone(est).fit(X[:30]).transform(X[:30]), rtol=1e-5, atol=1e-6)
    KT = K.T if K.ndim == 2 else K.transpose(1, 0, 3, 2)
    np.testing.assert_allclose(K, KT, rtol=1e-5, atol=1e-6)


def test_cached_cnn_features_extend_like_one_call():
    """A CNN's small conv layers use dense rows under projection="factored": features extended
    through the cache (32 rows, then 32:96) equal one featurisation at 96 rows."""
    from conftest import input_for

    model = TorchModel(make_cnn(), dtype="float64")
    X = input_for("cnn", 12)
    cache = FeatureCache()
    TraceNTK(model, projection_dim=32, memory=cache).fit(X)
    K = TraceNTK(model, projection_dim=96, memory=cache).fit(X).transform(X)
    np.testing.assert_allclose(K, TraceNTK(model, projection_dim=96).fit(X).transform(X),
                               rtol=1e-10, atol=1e-12)
