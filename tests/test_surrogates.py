"""Kernel-machine surrogates, explanations and fidelity metrics against direct computations."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import kendalltau
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.svm import SVC
from torch import nn

from skattr import TorchModel
from skattr.estimators import EmbeddingKernel, EmpiricalNTK, PseudoNTK, TraceNTK
from skattr.surrogates import (
    KernelSurrogate,
    accuracy_differential,
    class_scores,
    kendall_tau_fidelity,
    make_fidelity_scorer,
)


def _blobs(n_classes, n_per=25, d=6, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(n_classes, d) * 1.5
    y = np.repeat(np.arange(n_classes), n_per)
    X = (centers[y] + rng.randn(len(y), d)).astype(np.float32)
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


@pytest.fixture(scope="module")
def multi():
    X, y = _blobs(3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model = TorchModel(net, epochs=8, batch_size=16, random_state=0).fit(X[:50], y[:50])
    return model, X[:50], y[:50], X[50:], y[50:]


@pytest.fixture(scope="module")
def binary():
    X, y = _blobs(2, n_per=30)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    model = TorchModel(net, epochs=8, batch_size=16, random_state=0).fit(X[:40], y[:40])
    return model, X[:40], y[:40], X[40:], y[40:]


# ----------------------------------------------------------------------------- explain
def _check_explain(sur, Xt):
    E = sur.explain(Xt)
    D = sur.decision_function(Xt)
    est = sur.estimator_
    b = np.atleast_1d(getattr(est, "intercept_", 0.0))
    assert E.shape == (len(Xt), sur.kernel_.n_fit_)
    if D.ndim == 1:
        np.testing.assert_allclose(E.sum(1) + b[0], D, rtol=1e-9, atol=1e-9)
    else:
        ci = np.searchsorted(sur.classes_, sur.predict(Xt))
        bi = b[ci] if b.size > 1 else np.full(len(Xt), b[0])
        np.testing.assert_allclose(E.sum(1) + bi, D[np.arange(len(Xt)), ci], rtol=1e-9, atol=1e-9)
        # an explicit target class explains that class's decision value
        t = sur.classes_[0]
        Et = sur.explain(Xt, target=t)
        np.testing.assert_allclose(Et.sum(1) + (b[0] if b.size else 0), D[:, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimator", ["kglm", "klr", "krr"])
def test_explain_sums_to_decision_multiclass(multi, estimator):
    model, X, y, Xt, _ = multi
    sur = KernelSurrogate(TraceNTK(model), estimator).fit(X)
    _check_explain(sur, Xt)


@pytest.mark.parametrize("estimator", ["kglm", "klr", "svc", "krr"])
def test_explain_sums_to_decision_binary(binary, estimator):
    model, X, y, Xt, _ = binary
    sur = KernelSurrogate(TraceNTK(model), estimator).fit(X)
    assert sur.decision_function(Xt).ndim == 1
    _check_explain(sur, Xt)
    # with the true labels as targets too
    _check_explain(KernelSurrogate(PseudoNTK(model), estimator).fit(X, y), Xt)


def test_explain_is_w_times_k(binary):
    """Contributions are w_j K(x, x_j), the kernel machine's own dual coefficients."""
    model, X, y, Xt, _ = binary
    sur = KernelSurrogate(TraceNTK(model), "svc").fit(X, y)
    K = TraceNTK(model).fit(X).transform(Xt)
    w = np.zeros(len(X))
    w[sur.estimator_.support_] = sur.estimator_.dual_coef_[0]
    np.testing.assert_allclose(sur.explain(Xt), K * w[None, :], rtol=1e-10, atol=1e-12)


def test_explain_refuses_multiclass_svc_and_full_kernel(multi):
    model, X, _, Xt, _ = multi
    with pytest.raises(NotImplementedError, match="multi-class SVC"):
        KernelSurrogate(TraceNTK(model), "svc").fit(X).explain(Xt)
    with pytest.raises(NotImplementedError, match="scalar kernels"):
        KernelSurrogate(EmpiricalNTK(model), "krr").fit(X).explain(Xt)


# ----------------------------------------------------------------------------- fitting
def test_default_targets_are_the_network_predictions(multi):
    model, X, _, Xt, _ = multi
    sur = KernelSurrogate(TraceNTK(model), "kglm", random_state=3).fit(X)
    K = TraceNTK(model).fit(X).transform(X)
    ref = SGDClassifier(loss="log_loss", penalty="l2", alpha=1e-4, class_weight="balanced",
                        max_iter=1000, tol=1e-4, random_state=3).fit(K, model.predict(X))
    Kt = TraceNTK(model).fit(X).transform(Xt)
    np.testing.assert_allclose(sur.decision_function(Xt), ref.decision_function(Kt), rtol=1e-10)
    np.testing.assert_array_equal(sur.predict(Xt), ref.predict(Kt))
    np.testing.assert_array_equal(sur.classes_, ref.classes_)


def test_klr_is_logistic_regression_on_the_kernel(multi):
    """'klr' is the kGLM solved to convergence: sklearn's LogisticRegression on K(X, X)."""
    from sklearn.linear_model import LogisticRegression

    model, X, _, Xt, _ = multi
    sur = KernelSurrogate(TraceNTK(model), "klr").fit(X)
    K = TraceNTK(model).fit(X).transform(X)
    ref = LogisticRegression(C=1.0, max_iter=5000).fit(K, model.predict(X))
    Kt = TraceNTK(model).fit(X).transform(Xt)
    np.testing.assert_allclose(sur.predict_proba(Xt), ref.predict_proba(Kt), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(sur.predict(Xt), ref.predict(Kt))


def test_krr_regresses_the_network_logits(multi):
    model, X, _, Xt, _ = multi
    sur = KernelSurrogate(TraceNTK(model), "krr").fit(X)
    K = TraceNTK(model).fit(X).transform(X)
    Kt = TraceNTK(model).fit(X).transform(Xt)
    Z = model.decision_function(X).astype(np.float64)
    dual = np.linalg.solve(K + 1e-3 * np.eye(len(K)), Z)
    np.testing.assert_allclose(sur.decision_function(Xt), Kt @ dual, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sur.predict_proba(Xt), softmax(Kt @ dual, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(sur.predict(Xt), sur.classes_[(Kt @ dual).argmax(1)])


def test_vector_valued_krr_on_the_empirical_ntk(multi):
    model, X, _, Xt, _ = multi
    sur = KernelSurrogate(EmpiricalNTK(model, output="blocks"), "krr").fit(X)
    assert sur.kernel_.output == "flat"  # the surrogate uses the (sample, class) layout
    Kf = EmpiricalNTK(model).fit(X).transform(X)  # (n*C, n*C)
    Ktf = EmpiricalNTK(model).fit(X).transform(Xt)
    Z = model.decision_function(X).astype(np.float64)
    alpha = 1e-3 * np.diag(Kf).mean()  # "krr": a ridge relative to the kernel's scale
    dual = np.linalg.solve(Kf + alpha * np.eye(len(Kf)), Z.ravel())
    np.testing.assert_allclose(sur.decision_function(Xt), (Ktf @ dual).reshape(-1, 3), rtol=1e-5,
                               atol=1e-7)


def test_labels_given_as_strings(binary, multi):
    model, X, y, Xt, _ = binary
    names = np.array(["neg", "pos"])
    for est in ("kglm", "svc", "krr"):
        sur = KernelSurrogate(TraceNTK(model), est).fit(X, names[y])
        np.testing.assert_array_equal(sur.classes_, names)
        d = sur.decision_function(Xt)
        np.testing.assert_array_equal(sur.predict(Xt), names[(d > 0).astype(int)])
    # a regressor on 3 string classes: one indicator column per class
    model3, X3, y3, Xt3, _ = multi
    sur = KernelSurrogate(TraceNTK(model3), "krr").fit(X3, np.array(list("abc"))[y3])
    assert sur.decision_function(Xt3).shape == (len(Xt3), 3)
    np.testing.assert_array_equal(sur.predict(Xt3), np.array(list("abc"))[sur.decision_function(Xt3).argmax(1)])


def test_any_sklearn_estimator_and_any_kernel(multi):
    model, X, _, Xt, _ = multi
    sur = KernelSurrogate(EmbeddingKernel(model), LogisticRegression(C=10.0)).fit(X)
    assert isinstance(sur.estimator_, LogisticRegression)
    assert sur.predict_proba(Xt).shape == (len(Xt), 3)
    _check_explain(sur, Xt)
    # the estimator passed in is cloned, not fitted in place
    proto = SVC(kernel="precomputed")
    KernelSurrogate(TraceNTK(model), proto).fit(X)
    assert not hasattr(proto, "support_")


def test_surrogate_predict_proba_is_a_distribution(multi, binary):
    for model, X, _, Xt, _ in (multi, binary):
        for est in ("kglm", "svc", "krr"):
            P = KernelSurrogate(TraceNTK(model), est).fit(X).predict_proba(Xt)
            assert np.all(P >= 0)
            np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-10)


def test_surrogate_fidelity_on_a_trained_network(multi, binary):
    """Sanity: a trNTK surrogate tracks its network (the eNTK paper's claim, loosely)."""
    for model, X, _, Xt, yt in (multi, binary):
        sur = KernelSurrogate(TraceNTK(model), "krr").fit(X)
        assert sur.score(Xt, yt) > 0.5
        assert np.mean(sur.predict(Xt) == model.predict(Xt)) > 0.8


# ----------------------------------------------------------------------------- fidelity
def test_kendall_tau_fidelity_definition():
    rng = np.random.RandomState(0)
    P = softmax(rng.randn(30, 3) * 2, axis=1)
    S = P + 0.1 * rng.randn(30, 3)
    cls = rng.randint(0, 3, 30)
    idx = np.arange(30)
    expected = kendalltau(P[idx, cls], S[idx, cls]).statistic
    assert kendall_tau_fidelity(P, S, cls) == pytest.approx(expected)
    # binary: class 1 by default; any monotone transform of the scores gives the same tau
    Pb = np.stack([1 - P[:, 0], P[:, 0]], 1)
    assert kendall_tau_fidelity(Pb, np.log(Pb[:, 1] / Pb[:, 0])) == pytest.approx(1.0)
    # probabilities of exactly 0 or 1 are dropped
    a = np.array([0.0, 0.2, 0.5, 1.0, 0.7])
    b = np.array([9.0, 1.0, 2.0, -9.0, 3.0])
    assert kendall_tau_fidelity(a, b) == pytest.approx(1.0)


def test_kendall_tau_fidelity_errors():
    with pytest.raises(ValueError, match="pass the class index"):
        kendall_tau_fidelity(np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="differ in shape"):
        kendall_tau_fidelity(np.array([0.1, 0.2]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="Fewer than two points"):
        kendall_tau_fidelity(np.array([0.0, 1.0, 0.5]), np.array([1.0, 2.0, 3.0]))


def test_accuracy_differential():
    assert accuracy_differential([0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(-0.25)
    assert accuracy_differential([0, 1], [0, 1], [1, 1]) == pytest.approx(0.5)


def test_surrogate_score_is_kendall_tau(multi, binary):
    model, X, _, Xt, yt = multi
    sur = KernelSurrogate(TraceNTK(model), "kglm").fit(X)
    P, S = model.predict_proba(Xt), sur.predict_proba(Xt)
    keep = np.arange(len(Xt))
    assert sur.score(Xt, yt) == pytest.approx(kendalltau(P[keep, yt], S[keep, yt]).statistic)
    # without y: the network's predicted class
    pred = P.argmax(1)
    assert sur.score(Xt) == pytest.approx(kendalltau(P[keep, pred], S[keep, pred]).statistic)
    model, X, _, Xt, yt = binary
    sur = KernelSurrogate(TraceNTK(model), "svc").fit(X)
    P, S = model.predict_proba(Xt), sur.predict_proba(Xt)
    assert sur.score(Xt, yt) == pytest.approx(kendalltau(P[:, 1], S[:, 1]).statistic)


def test_make_fidelity_scorer(multi, binary):
    from sklearn.pipeline import make_pipeline

    for model, X, y, Xt, yt in (multi, binary):
        pipe = make_pipeline(TraceNTK(model), SVC(kernel="precomputed")).fit(X, y)
        scorer = make_fidelity_scorer(model)
        P = model.predict_proba(Xt)
        S = class_scores(pipe, Xt)
        if P.shape[1] == 2:
            expected = kendalltau(P[:, 1], S).statistic
        else:
            expected = kendalltau(P[np.arange(len(Xt)), yt], S[np.arange(len(Xt)), yt]).statistic
        assert scorer(pipe, Xt, yt) == pytest.approx(expected)


def test_class_scores():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 3)
    y = (X[:, 0] > 0).astype(int)
    lr = LogisticRegression().fit(X, y)
    np.testing.assert_array_equal(class_scores(lr, X), lr.predict_proba(X))
    svc = SVC().fit(X, y)  # probability=False: the binary decision value as is
    np.testing.assert_array_equal(class_scores(svc, X), svc.decision_function(X))
    y3 = np.digitize(X[:, 0], [-0.5, 0.5])
    svc3 = SVC(decision_function_shape="ovr").fit(X, y3)
    np.testing.assert_allclose(class_scores(svc3, X), softmax(svc3.decision_function(X), axis=1))


def test_surrogate_of_a_regression_network():
    """A regression network: 'krr' / 'svr' regress its outputs, predict gives outputs whose
    explanation sums back to them (KRR has no intercept), score is the Kendall tau between the
    network's and the surrogate's outputs, and classifiers are refused by name."""
    rng = np.random.RandomState(0)
    X = rng.randn(80, 5).astype(np.float32)
    y = (2 * X[:, 0] + np.sin(X[:, 1])).astype(np.float32)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    model = TorchModel(net, task="regression", epochs=5, random_state=0).fit(X, y)
    f = model.predict(X[60:])
    for est in ("krr", "svr"):
        sur = KernelSurrogate(TraceNTK(model), est).fit(X[:60])
        s = sur.predict(X[60:])
        assert s.shape == (20,)
        tau = sur.score(X[60:])
        assert tau == pytest.approx(kendalltau(f, s).statistic)
        assert tau > 0.6, (est, tau)
        if est == "krr":
            np.testing.assert_allclose(sur.explain(X[60:]).sum(1), s, rtol=1e-6, atol=1e-6)
        with pytest.raises(AttributeError, match="regression"):
            sur.predict_proba(X[60:])
    for est in ("svc", "kglm"):
        with pytest.raises(ValueError, match="'krr' or 'svr'"):
            KernelSurrogate(TraceNTK(model), est).fit(X[:60])


# ----------------------------------------------------------------------------- class alignment
@pytest.fixture(scope="module")
def four():
    """A 4-class network and a fit set on which it never predicts class 1 (so a surrogate fitted
    to its predictions has classes [0, 2, 3], not the network's [0, 1, 2, 3])."""
    X, y = _blobs(4, n_per=40)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    model = TorchModel(net, epochs=10, batch_size=16, random_state=0).fit(X[:100], y[:100])
    Xf = X[:100][model.predict(X[:100]) != 1]
    return model, Xf, X[100:], y[100:]


def _aligned_reference(model, P, S, classes, cls):
    """tau between the network's and the surrogate's probability of label ``cls[i]``, matched by
    label: the surrogate's probability of a label it does not have is 0."""
    labels = list(model.class_labels())
    Sf = np.zeros_like(P)
    for j, c in enumerate(classes):
        Sf[:, labels.index(c)] = S[:, j]
    col = np.array([labels.index(c) for c in cls])
    a, b = P[np.arange(len(P)), col], Sf[np.arange(len(P)), col]
    keep = (a > 0) & (a < 1)
    return kendalltau(a[keep], b[keep]).statistic


def test_score_aligns_the_surrogate_classes_with_the_network_by_label(four):
    """Issue 10 item 6: the surrogate's classes [0, 2, 3] are matched to the network's columns
    by label, not by position (before: P[:, 1] of label 1 was compared with S[:, 1] of label 2)."""
    model, Xf, Xt, yt = four
    sur = KernelSurrogate(TraceNTK(model), "klr").fit(Xf)
    np.testing.assert_array_equal(sur.classes_, [0, 2, 3])
    P, S = model.predict_proba(Xt), sur.predict_proba(Xt)
    keep = yt != 1  # labels the surrogate knows
    expected = _aligned_reference(model, P[keep], S[keep], sur.classes_, yt[keep])
    assert sur.score(Xt[keep], yt[keep]) == pytest.approx(expected)
    assert expected > 0.2  # a faithful surrogate; the misaligned score was negative
    # y=None: the network's predicted class, matched by label too
    pred = model.predict(Xt)
    expected = _aligned_reference(model, P, S, sur.classes_, pred)
    with pytest.warns(UserWarning, match=r"never saw.*\[1\]"):
        assert sur.score(Xt) == pytest.approx(expected)
    # labels the network knows but the surrogate never saw: its probability for them is 0
    with pytest.warns(UserWarning, match=r"never saw.*\[1\]"):
        tau = sur.score(Xt, yt)
    assert tau == pytest.approx(_aligned_reference(model, P, S, sur.classes_, yt))


def test_fidelity_scorer_aligns_classes_by_label(four):
    from sklearn.pipeline import make_pipeline

    model, Xf, Xt, yt = four
    pipe = make_pipeline(TraceNTK(model), LogisticRegression(max_iter=2000)).fit(Xf, model.predict(Xf))
    np.testing.assert_array_equal(pipe.classes_, [0, 2, 3])
    keep = yt != 1
    expected = _aligned_reference(model, model.predict_proba(Xt[keep]), pipe.predict_proba(Xt[keep]),
                                  pipe.classes_, yt[keep])
    assert make_fidelity_scorer(model)(pipe, Xt[keep], yt[keep]) == pytest.approx(expected)


def test_score_names_labels_unknown_to_the_network(four, binary):
    model, Xf, Xt, yt = four
    sur = KernelSurrogate(TraceNTK(model), "klr").fit(Xf)
    with pytest.raises(ValueError, match=r"\[7\].*not among the network's classes"):
        sur.score(Xt, np.where(yt == 3, 7, yt))
    with pytest.raises(ValueError, match=r"'b'.*not among the network's classes"):
        sur.score(Xt, np.array(list("abcd"))[yt])
    with pytest.raises(ValueError, match=r"\[9\].*not among the surrogate's classes"):
        sur.explain(Xt[:3], target=9)
    # a surrogate fitted to labels that are not the network's cannot be compared with it
    model2, X2, y2, Xt2, yt2 = binary
    sur2 = KernelSurrogate(TraceNTK(model2), "svc").fit(X2, np.array(["neg", "pos"])[y2])
    with pytest.raises(ValueError, match=r"'neg', 'pos'.*none of them among the network's"):
        sur2.score(Xt2, yt2)
    # column indices out of range are a clear error, not an IndexError
    with pytest.raises(ValueError, match="column indices"):
        kendall_tau_fidelity(np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3), [0, 1, 2, 3])
