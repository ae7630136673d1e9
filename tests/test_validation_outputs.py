"""Issue 10 items 7 and 8: no kernel returns NaN silently, softmax networks are warned about,
and every kernel's training block ``fit_transform(X, y)`` is a symmetric PSD Gram matrix.

References are independent of skattr's gradient engines: dense ``jacrev`` Jacobians (conftest)
for Grad-Cos, ``numpy.linalg.eigvalsh`` for the spectrum.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close, ref_jacobian, ref_kernel
from sklearn.datasets import load_digits
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from torch import nn

from skattr import TorchModel
from skattr._checks import check_features, check_outputs, nonfinite_parameters
from skattr.estimators import EmbeddingKernel, EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK
from skattr.surrogates import KernelSurrogate

# every kernel estimator of skattr.estimators, exact and projected
KERNELS = [
    (TraceNTK, {}),
    (TraceNTK, {"projection_dim": 64}),
    (PseudoNTK, {}),
    (PseudoNTK, {"projection_dim": 64}),
    (EmpiricalNTK, {}),
    (EmpiricalNTK, {"projection_dim": 64}),
    (EmpiricalNTK, {"normalize": True}),
    (GradCosKernel, {}),
    (GradCosKernel, {"projection_dim": 64}),
    (GradCosKernel, {"labels": "given"}),
    (GradCosKernel, {"labels": "given", "projection_dim": 64}),
    (GradCosKernel, {"normalize": False}),
    (EmbeddingKernel, {}),
    (EmbeddingKernel, {"normalize": False}),
]
IDS = [c.__name__ + "".join(f"-{k}={v}" for k, v in kw.items()) for c, kw in KERNELS]
GRADIENT_KERNELS = [(c, kw) for c, kw in KERNELS if c is not EmbeddingKernel]


def _relu_model(dtype="float32"):
    rng = np.random.RandomState(0)
    X = rng.randn(24, 6).astype(np.float32)
    y = np.arange(24) % 3
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return TorchModel(net, epochs=2, random_state=0, dtype=dtype).fit(X, y), X, y


@pytest.fixture(scope="module")
def relu():
    return _relu_model()


def _kernel(cls, kw, model):
    return cls(model, **kw)


# ----------------------------------------------------------------------------- item 7: NaN
@pytest.mark.parametrize("cls, kw", KERNELS, ids=IDS)
def test_nan_weights_raise_naming_the_parameter(relu, cls, kw):
    model, X, y = relu
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.network()[0].weight[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite parameters \['0.weight'\]"):
        _kernel(cls, kw, bad).fit(X, y)
    # through a surrogate too
    if cls is not EmbeddingKernel and "labels" not in kw:
        with pytest.raises(FloatingPointError, match="non-finite parameters"):
            KernelSurrogate(_kernel(cls, kw, bad), "krr").fit(X)


def _overflowing_inputs(model, n=24):
    """Finite float32 inputs of 3e38 whose signs follow the first-layer unit with the largest
    L1 weight norm: that unit's pre-activation exceeds float32's range."""
    W = model.network()[0].weight.detach().numpy()
    u = np.abs(W).sum(1).argmax()
    big = np.tile(np.sign(W[u]) * np.float32(3e38), (n, 1)).astype(np.float32)
    assert np.all(np.isfinite(big))
    assert not np.any(np.isfinite(model.decision_function(big)).all(1))  # the premise
    return big


@pytest.mark.parametrize("cls, kw", KERNELS, ids=IDS)
def test_overflowing_outputs_raise(relu, cls, kw):
    """Finite inputs of 3e38 overflow the first layer: the outputs are inf/NaN (before: an
    all-NaN kernel, without a word)."""
    model, X, y = relu
    big = _overflowing_inputs(model)
    word = "embeddings" if cls is EmbeddingKernel else "outputs"
    est = _kernel(cls, kw, model).fit(X, y)
    with pytest.raises(FloatingPointError, match=word):
        est.transform(big)
    with pytest.raises(FloatingPointError, match=word):
        _kernel(cls, kw, model).fit(big, y)


@pytest.mark.parametrize("cls, kw", KERNELS, ids=IDS)
def test_overflowing_gradients_with_finite_outputs_raise(relu, cls, kw):
    """Inputs of 1e20: outputs ~1e20 are finite in float32, squared gradient norms ~1e40 are not
    (before: NaN, or a silently zero normalised kernel). Never a NaN: an error naming the
    gradients, or a finite kernel equal to the float64 model's."""
    model, X, y = relu
    big = X * np.float32(1e20)
    assert np.all(np.isfinite(model.decision_function(big)))
    word = "embeddings" if cls is EmbeddingKernel else "gradients"
    # float64 holds them: the same inputs give a finite kernel
    model64 = _relu_model("float64")[0]
    K64 = _kernel(cls, kw, model64).fit(X, y).transform(big)
    assert np.all(np.isfinite(K64))
    est = _kernel(cls, kw, model).fit(X, y)
    if cls is GradCosKernel and "projection_dim" in kw:
        # at logits ~1e20 the softmax saturates: the loss gradient at the predicted label is
        # exactly 0, so the projected features are finite (0) and so is the kernel
        np.testing.assert_allclose(est.transform(big), K64, atol=1e-6)
        return
    with pytest.raises(FloatingPointError, match=word):
        est.transform(big)


def test_softmax_outputs_warn_to_pass_logits(relu):
    model, X, y = relu
    torch.manual_seed(0)
    soft = TorchModel(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1)))
    logsoft = TorchModel(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3),
                                       nn.LogSoftmax(dim=1)))
    for cls, kw in GRADIENT_KERNELS:
        for m in (soft, logsoft):
            with pytest.warns(UserWarning, match="pass the logits"):
                _kernel(cls, kw, m).fit(X, y)
    # logits: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for cls, kw in KERNELS:
            _kernel(cls, kw, model).fit(X, y)


def test_check_helpers():
    z = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0]])
    with pytest.raises(FloatingPointError, match=r"2 of 3 samples.*\[1, 2\]"):
        check_outputs(z, where="here")
    P = torch.softmax(torch.randn(5, 3), 1)
    with pytest.warns(UserWarning, match="probabilities"):
        check_outputs(P, where="here")
    with pytest.warns(UserWarning, match="log-probabilities"):
        check_outputs(P.log(), where="here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_outputs(torch.randn(5, 3), where="here")
        check_outputs(P[:, :1], where="here")  # one output: nothing to sum to one
        check_outputs(P, where="here", task="regression")
    with pytest.raises(FloatingPointError, match=r"the gradients are NaN or infinite for 1 of 2"):
        check_features(torch.tensor([[1.0], [float("inf")]]), where="here", what="the gradients")
    net = nn.Linear(2, 2)
    assert nonfinite_parameters(net) == []
    with torch.no_grad():
        net.bias[0] = float("inf")
    assert nonfinite_parameters(net) == ["bias"]


# ----------------------------------------------------------------------------- item 8: Gram
@pytest.fixture(scope="module")
def digits_mlp():
    """A trained MLP that misclassifies part of its training set (so labels matter)."""
    X, y = load_digits(return_X_y=True)
    X = (X[:150] / 16).astype(np.float32)
    y = y[:150]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = TorchModel(net, epochs=8, lr=0.05, random_state=0).fit(X, y)
    acc = np.mean(model.predict(X) == y)
    assert 0.3 < acc < 0.97, acc
    return model, X, y


def _assert_gram(K):
    K = np.asarray(K, dtype=np.float64)
    assert K.shape[0] == K.shape[1]
    scale = np.abs(K).max()
    assert np.abs(K - K.T).max() <= 1e-6 * scale, np.abs(K - K.T).max() / scale
    ev = np.linalg.eigvalsh((K + K.T) / 2)
    assert ev[0] >= -1e-6 * ev[-1], (ev[0], ev[-1])


@pytest.mark.parametrize("cls, kw", KERNELS, ids=IDS)
def test_training_block_is_a_symmetric_psd_gram(digits_mlp, cls, kw):
    """Issue 10 item 8: what a pipeline feeds SVC(kernel='precomputed') at fit is a Gram matrix
    (before: Grad-Cos had rows at predicted and columns at given labels, min eigenvalue < 0)."""
    model, X, y = digits_mlp
    est = _kernel(cls, kw, model)
    K = est.fit_transform(X, y)
    _assert_gram(K)
    # the pipeline's SVC is fitted on this very matrix
    if cls is not EmpiricalNTK:
        pipe = make_pipeline(_kernel(cls, kw, model), SVC(kernel="precomputed")).fit(X, y)
        np.testing.assert_allclose(pipe[0].fit_transform(X, y), K, rtol=1e-6, atol=1e-7)
        assert pipe.score(X, y) > 0.5


def test_gradcos_labels_rule_against_jacrev():
    """labels='predicted' (default): the loss at the network's predicted label on both sides;
    labels='given': the fit set (and rows passed with y) at the given labels, rows without y at
    the predicted ones."""
    from conftest import input_for, make_mlp

    net = make_mlp()
    XB, XA = input_for("mlp", 8, seed=3), input_for("mlp", 5, seed=2)
    yB = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    model = TorchModel(net, dtype="float64")
    with torch.no_grad():
        predB = net.eval()(torch.as_tensor(XB)).argmax(1).numpy()
    assert np.any(predB != yB)

    def ref_given(XA_, yA, XB_, yB_):
        def loss(z, yi):
            return F.cross_entropy(z, yi, reduction="none")

        gA = ref_jacobian(net, XA_, fn=loss, y=torch.as_tensor(yA))[:, 0]
        gB = ref_jacobian(net, XB_, fn=loss, y=torch.as_tensor(yB_))[:, 0]
        return (gA @ gB.T) / torch.outer(gA.norm(dim=1), gB.norm(dim=1))

    for kw in ({}, {"projection_dim": None, "method": "vmap"}):
        pred = GradCosKernel(model, **kw)
        # y is not used: the fit set at its predicted labels, as the transformed rows
        assert_rel_close(pred.fit_transform(XB, yB), ref_kernel("gradcos", net, XB, XB, normalize=True,
                                                                 yB=predB), rtol=1e-5)
        np.testing.assert_allclose(pred.fit(XB, yB).transform(XB), pred.fit_transform(XB, yB), rtol=1e-10)
        assert_rel_close(pred.transform(XA), ref_kernel("gradcos", net, XA, XB, normalize=True,
                                                        yB=predB), rtol=1e-5)
        given = GradCosKernel(model, labels="given", **kw)
        assert_rel_close(given.fit_transform(XB, yB), ref_given(XB, yB, XB, yB), rtol=1e-5)
        given.fit(XB, yB)
        assert_rel_close(given.transform(XB, yB), ref_given(XB, yB, XB, yB), rtol=1e-5)
        # rows without labels: the network's predicted labels (unknown test labels)
        assert_rel_close(given.transform(XA), ref_kernel("gradcos", net, XA, XB, normalize=True,
                                                         yB=yB), rtol=1e-5)
        # without labels, the same rule: the predicted labels, as labels='predicted'
        np.testing.assert_allclose(GradCosKernel(model, labels="given", **kw).fit_transform(XB),
                                   pred.fit_transform(XB, yB), rtol=1e-10)
    with pytest.raises(ValueError, match="takes y only with labels='given'"):
        GradCosKernel(model).fit(XB).transform(XA, yB[:5])
