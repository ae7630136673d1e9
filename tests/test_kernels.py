"""Every kernel equals a brute-force reference built from ``torch.func.jacrev``.

The references (``conftest.ref_kernel``) are independent of ``skattr.gradients``: dense per-example
Jacobians from ``jacrev(functional_call(...))`` one example at a time, contracted with ``einsum``.
"""

import functools

import numpy as np
import pytest
import torch
from conftest import (
    MAKERS,
    assert_rel_close,
    input_for,
    make_cnn,
    make_mlp,
    ref_kernel,
)
from torch import nn

from skattr import TorchModel
from skattr.estimators import (
    EmbeddingKernel,
    EmpiricalNTK,
    GradCosKernel,
    PseudoNTK,
    TraceNTK,
)

SCALAR = {"trace": TraceNTK, "pseudo": PseudoNTK,
          "gradcos": functools.partial(GradCosKernel, labels="given")}


def _data(arch, n_a=4, n_b=6):
    return input_for(arch, n_a, seed=2), input_for(arch, n_b, seed=3)


def _fit_labels(n, C):
    return np.arange(n) % max(C, 2)


# ----------------------------------------------------------------------------- scalar kernels
@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("method", ["structured", "vmap"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", ["trace", "pseudo", "gradcos"])
def test_scalar_kernels_match_jacrev(arch, method, normalize, kind):
    net = MAKERS[arch]()
    XA, XB = _data(arch)
    yB = _fit_labels(len(XB), 3)
    model = TorchModel(net, dtype="float64")
    est = SCALAR[kind](model, normalize=normalize, method=method)
    K = est.fit(XB, yB if kind == "gradcos" else None).transform(XA)
    R = ref_kernel(kind, net, XA, XB, normalize=normalize, yB=yB)
    assert K.shape == (len(XA), len(XB)) and K.dtype == np.float64
    assert_rel_close(K, R, rtol=1e-5)
    # the diagonal K(x, x)
    d = est.diagonal(XA)
    if normalize:
        np.testing.assert_allclose(d, 1.0)
        # fitted without y, both sides use the network's predicted labels: unit diagonal
        np.testing.assert_allclose(np.diag(est.fit(XA).transform(XA)), 1.0, rtol=1e-12)
    else:
        with torch.no_grad():
            pred = net.eval()(torch.as_tensor(XA)).argmax(1).numpy()
        RA = ref_kernel(kind, net, XA, XA, normalize=False, yB=pred)
        assert_rel_close(d, torch.diagonal(RA), rtol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("method", ["structured", "vmap"])
@pytest.mark.parametrize("normalize", [True, False])
def test_empirical_ntk_blocks_and_flat_match_jacrev(arch, method, normalize):
    net = MAKERS[arch]()
    XA, XB = _data(arch)
    model = TorchModel(net, dtype="float64")
    R = ref_kernel("full", net, XA, XB, normalize=normalize)  # (nA, nB, C, C)
    B = EmpiricalNTK(model, output="blocks", normalize=normalize, method=method).fit(XB).transform(XA)
    assert B.shape == (4, 6, 3, 3)
    assert_rel_close(B, R, rtol=1e-5)
    Fl = EmpiricalNTK(model, output="flat", normalize=normalize, method=method).fit(XB).transform(XA)
    assert Fl.shape == (4 * 3, 6 * 3)
    # row i*C + c, column j*C + c' holds block entry (c, c') of K(x_i, x_j)
    for i in range(4):
        for j in range(6):
            for c in range(3):
                for c2 in range(3):
                    assert Fl[i * 3 + c, j * 3 + c2] == pytest.approx(B[i, j, c, c2], rel=1e-12,
                                                                    abs=1e-300)
    # trace of the normalised blocks is the normalised trace NTK
    if normalize:
        T = TraceNTK(model, method=method).fit(XB).transform(XA)
        np.testing.assert_allclose(np.trace(B, axis1=2, axis2=3), T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prefixes", [["0."], ["1."], ["0.bias", "7.weight"], ["6"], ["3.weight"]])
@pytest.mark.parametrize("method", ["structured", "vmap"])
def test_params_prefix_selection(prefixes, method):
    """Only the selected parameters (conv bias, BN affine, LayerNorm, a conv weight...) count."""
    net = make_cnn()
    XA, XB = _data("cnn")
    model = TorchModel(net, dtype="float64", params=prefixes)
    for kind in ("trace", "pseudo"):
        K = SCALAR[kind](model, normalize=False, method=method).fit(XB).transform(XA)
        R = ref_kernel(kind, net, XA, XB, normalize=False, prefixes=prefixes)
        assert_rel_close(K, R, rtol=1e-5)
    # selecting a subset changes the kernel (the selection is not ignored)
    full = TraceNTK(TorchModel(net, dtype="float64"), normalize=False).fit(XB).transform(XA)
    assert not np.allclose(full, TraceNTK(model, normalize=False).fit(XB).transform(XA))


def test_params_prefix_as_string_equals_list():
    net = make_mlp()
    XA, XB = _data("mlp")
    K1 = TraceNTK(TorchModel(net, dtype="float64", params="4.")).fit(XB).transform(XA)
    K2 = TraceNTK(TorchModel(net, dtype="float64", params=["4."])).fit(XB).transform(XA)
    np.testing.assert_array_equal(K1, K2)
    R = ref_kernel("trace", net, XA, XB, normalize=True, prefixes=["4."])
    assert_rel_close(K1, R)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["trace", "pseudo", "gradcos"])
def test_float32_models_match_float64_reference(arch, kind):
    net64 = MAKERS[arch]()
    net32 = MAKERS[arch](dtype=torch.float32)
    XA, XB = _data(arch)
    yB = _fit_labels(len(XB), 3)
    for normalize in (True, False):
        est = SCALAR[kind](TorchModel(net32), normalize=normalize)
        K = est.fit(XB.astype(np.float32), yB if kind == "gradcos" else None).transform(
            XA.astype(np.float32))
        assert K.dtype == np.float64  # output is always float64
        R = ref_kernel(kind, net64, XA, XB, normalize=normalize, yB=yB)
        assert_rel_close(K, R, rtol=1e-5)


@pytest.mark.parametrize("method", ["structured", "vmap"])
def test_regression_task_kernels(method):
    net = make_mlp(n_out=2)
    XA, XB = _data("mlp")
    model = TorchModel(net, task="regression", dtype="float64")
    for kind in ("trace", "pseudo"):
        for normalize in (True, False):
            K = SCALAR[kind](model, normalize=normalize, method=method).fit(XB).transform(XA)
            assert_rel_close(K, ref_kernel(kind, net, XA, XB, normalize=normalize))
    B = EmpiricalNTK(model, output="blocks", method=method).fit(XB).transform(XA)
    assert_rel_close(B, ref_kernel("full", net, XA, XB, normalize=False))


def test_gradcos_refuses_regression_models():
    """The loss gradient at a regression model's own prediction is zero: no cosine to take."""
    net = make_mlp(n_out=1)
    _, XB = _data("mlp")
    model = TorchModel(net, task="regression", dtype="float64")
    with pytest.raises(ValueError, match="GradCosKernel needs a classification model"):
        GradCosKernel(model).fit(XB, np.linspace(-1, 1, len(XB)))


@pytest.mark.parametrize("method", ["structured", "vmap"])
def test_binary_single_logit_kernels(method):
    net = make_mlp(n_out=1)
    XA, XB = _data("mlp")
    yB = np.array([0, 1, 1, 0, 1, 0])
    model = TorchModel(net, dtype="float64")
    for kind in ("trace", "pseudo", "gradcos"):
        K = SCALAR[kind](model, normalize=False, method=method).fit(
            XB, yB if kind == "gradcos" else None).transform(XA)
        assert_rel_close(K, ref_kernel(kind, net, XA, XB, normalize=False, yB=yB))


# ----------------------------------------------------------------------------- engine fallbacks
class _Scale(nn.Module):
    """A layer the structured engine does not know (a raw parameter)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class _Shared(nn.Module):
    """One Linear applied twice per forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(5, 6), _Scale(6), nn.Tanh(), nn.Linear(6, 3)),
        lambda: _Shared(),
        lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)),
    ],
    ids=["unknown-layer", "shared-weights", "inplace-relu"],
)
def test_auto_engine_falls_back_correctly(build):
    torch.manual_seed(3)
    net = build().double()
    XA, XB = _data("mlp")
    model = TorchModel(net, dtype="float64")
    K = TraceNTK(model, normalize=False).fit(XB).transform(XA)
    assert_rel_close(K, ref_kernel("trace", net, XA, XB, normalize=False))
    B = EmpiricalNTK(model, output="blocks").fit(XB).transform(XA)
    assert_rel_close(B, ref_kernel("full", net, XA, XB, normalize=False))


def test_structured_engine_refuses_unknown_layers():
    net = nn.Sequential(nn.Linear(5, 6), _Scale(6), nn.Linear(6, 3)).double()
    XA, XB = _data("mlp")
    with pytest.raises(ValueError, match="structured gradient engine cannot handle"):
        TraceNTK(TorchModel(net, dtype="float64"), method="structured").fit(XB)
    # ... unless only supported layers are selected
    model = TorchModel(net, dtype="float64", params=["0.", "2."])
    K = TraceNTK(model, method="structured", normalize=False).fit(XB).transform(XA)
    assert_rel_close(K, ref_kernel("trace", net, XA, XB, normalize=False, prefixes=["0.", "2."]))


# ----------------------------------------------------------------------------- conv / norm variety
def test_conv1d_groupnorm_batchnorm1d():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(20, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
    ).double().eval()
    with torch.no_grad():
        net[5].running_mean.normal_()
        net[5].running_var.uniform_(0.5, 2)
        net[5].weight.normal_()
        net[1].weight.normal_()
    g = torch.Generator().manual_seed(0)
    XA = torch.randn(4, 2, 7, generator=g, dtype=torch.float64).numpy()
    XB = torch.randn(5, 2, 7, generator=g, dtype=torch.float64).numpy()
    for method in ("structured", "vmap"):
        model = TorchModel(net, dtype="float64")
        K = TraceNTK(model, normalize=False, method=method).fit(XB).transform(XA)
        assert_rel_close(K, ref_kernel("trace", net, XA, XB, normalize=False))


def test_batchnorm_is_used_in_eval_mode():
    """Kernels see the running statistics: a batch of one and a batch of many agree."""
    net = make_cnn()
    net.train()  # the user's module may be in train mode; kernels must evaluate in eval mode
    XA, XB = _data("cnn")
    model = TorchModel(net, dtype="float64")
    K1 = TraceNTK(model, batch_size=1).fit(XB).transform(XA)
    K2 = TraceNTK(model, batch_size=64).fit(XB).transform(XA)
    np.testing.assert_allclose(K1, K2, rtol=1e-10)
    assert_rel_close(K2, ref_kernel("trace", make_cnn(), XA, XB, normalize=True))


# ----------------------------------------------------------------------------- embedding kernel
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_kernel(arch, normalize):
    net = MAKERS[arch]()
    XA, XB = _data(arch)
    with torch.no_grad():
        EA = net[:-1](torch.as_tensor(XA)).flatten(1)
        EB = net[:-1](torch.as_tensor(XB)).flatten(1)
    if normalize:
        EA = EA / EA.norm(dim=1, keepdim=True)
        EB = EB / EB.norm(dim=1, keepdim=True)
    K = EmbeddingKernel(TorchModel(net, dtype="float64"), normalize=normalize).fit(XB).transform(XA)
    assert_rel_close(K, EA @ EB.T, rtol=1e-10)


def test_embedding_kernel_layer():
    net = make_mlp()
    XA, XB = _data("mlp")
    with torch.no_grad():
        EA = torch.tanh(net[0](torch.as_tensor(XA)))
        EB = torch.tanh(net[0](torch.as_tensor(XB)))
    K = EmbeddingKernel(TorchModel(net, dtype="float64"), layer="2", normalize=False)
    assert_rel_close(K.fit(XB).transform(XA), EA @ EB.T, rtol=1e-10)


# ----------------------------------------------------------------------------- batching, tensors
@pytest.mark.parametrize("cls", [TraceNTK, PseudoNTK, GradCosKernel, EmpiricalNTK])
def test_kernels_do_not_depend_on_batch_size(cls):
    net = make_cnn()
    XA, XB = _data("cnn", 7, 9)
    model = TorchModel(net, dtype="float64")
    K1 = cls(model, batch_size=2).fit(XB).transform(XA)
    K2 = cls(model, batch_size=100).fit(XB).transform(XA)
    np.testing.assert_allclose(K1, K2, rtol=1e-10, atol=1e-13)


def test_tensor_input_equals_numpy_input():
    net = make_cnn()
    XA, XB = _data("cnn")
    model = TorchModel(net, dtype="float64")
    K1 = TraceNTK(model).fit(XB).transform(XA)
    K2 = TraceNTK(model).fit(torch.as_tensor(XB)).transform(torch.as_tensor(XA))
    np.testing.assert_array_equal(K1, K2)


def test_kernel_keeps_a_private_copy_of_the_model():
    """Changing the user's network after fit does not change a fitted kernel."""
    net = make_mlp()
    XA, XB = _data("mlp")
    est = TraceNTK(TorchModel(net, dtype="float64"), normalize=False).fit(XB)
    K0 = est.transform(XA)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    np.testing.assert_array_equal(est.transform(XA), K0)
