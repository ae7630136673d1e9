"""Networks the rest of the suite does not use: tied weights, token inputs, recurrent layers,
in-place residual blocks, and the gradient engines' memory planner.

Every reference here is brute force and independent of ``skattr.gradients``: one example at a
time, one output at a time, ``torch.autograd.grad`` over the network's *unique* parameters
(``named_parameters()``, which lists a tied parameter once, under its first name).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from torch import nn

from skattr import TorchModel
from skattr import gradients as G
from skattr.estimators import TRAK, TraceNTK

V = 11  # vocabulary size of the token models
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


# ----------------------------------------------------------------------------- models
class TiedLinear(nn.Module):
    """Two Linear layers sharing one weight (each keeps its own bias)."""

    def __init__(self):
        super().__init__()
        self.h1 = nn.Linear(5, 5)
        self.h2 = nn.Linear(5, 5)
        self.h2.weight = self.h1.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.h2(torch.tanh(self.h1(x)))))


class TiedLM(nn.Module):
    """Token ids -> embedding -> Linear -> decoder tied to the embedding, averaged over positions."""

    def __init__(self, d=6):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.body = nn.Linear(d, d)
        self.dec = nn.Linear(d, V)
        self.dec.weight = self.emb.weight

    def forward(self, t):
        return self.dec(torch.tanh(self.body(self.emb(t)))).mean(1)


class TokenTransformer(nn.Module):
    """Token ids -> embedding -> one Transformer encoder layer -> mean -> classifier."""

    def __init__(self, d=8, n_out=3):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(d, n_out)

    def forward(self, t):
        return self.head(self.enc(self.emb(t)).mean(1))


class RNNNet(nn.Module):
    """A GRU or LSTM over (n, L, 3) sequences; the last hidden state feeds a Linear head."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetTiny(nn.Module):
    def __init__(self, n_out=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.fc = nn.Linear(6, n_out)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _nontrivial_bn(net):
    g = torch.Generator().manual_seed(5)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(c, generator=g))
                mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return net


def _build(name, dtype):
    torch.manual_seed(0)
    net = {
        "tied-linear": TiedLinear,
        "tied-lm": TiedLM,
        "transformer": TokenTransformer,
        "gru": lambda: RNNNet("GRU"),
        "lstm": lambda: RNNNet("LSTM"),
        "resnet": lambda: _nontrivial_bn(ResNetTiny()),
    }[name]()
    return net.to(dtype).eval()


def _inputs(name, n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if name in ("tied-lm", "transformer"):
        return torch.randint(0, V, (n, 4), generator=g)
    shape = {"tied-linear": (5,), "gru": (5, 3), "lstm": (5, 3), "resnet": (1, 6, 6)}[name]
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)


CASES = [("tied-linear", torch.float64), ("tied-lm", torch.float64),
         ("transformer", torch.float64), ("gru", torch.float32), ("gru", torch.float64),
         ("lstm", torch.float32), ("lstm", torch.float64), ("resnet", torch.float64)]
IDS = [f"{n}-{str(d)[6:]}" for n, d in CASES]


# ----------------------------------------------------------------------------- references
def brute_force(net, X, fn=None, y=None):
    """Per-example gradients (n, m, p) of ``fn(logits, y)`` (default: the logits) over the unique
    parameters, by one ``torch.autograd.grad`` per example and output."""
    params = [p for _, p in net.named_parameters()]  # each Parameter once
    rows = []
    for i in range(X.shape[0]):
        with torch.enable_grad():
            z = net(X[i : i + 1])
            out = z if fn is None else fn(z, y[i : i + 1])
            out = out.reshape(-1)
            per = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params,
                                                                         retain_graph=True)])
                   for o in range(out.shape[0])]
        rows.append(torch.stack(per))
    return torch.stack(rows).detach()


def _margin(z, y):
    zc = z.gather(1, y[:, None])[:, 0]
    return zc - torch.logsumexp(z.scatter(1, y[:, None], float("-inf")), dim=1)


def _ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-9


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_records_match_brute_force(name, dtype, method):
    """Records (flatten, gram, self_gram) of every engine equal the brute force."""
    net = _build(name, dtype)
    X, X2 = _inputs(name, 5, dtype=dtype), _inputs(name, 3, seed=2, dtype=dtype)
    J, J2 = brute_force(net, X), brute_force(net, X2)
    assert J.shape[-1] == sum(p.numel() for p in net.parameters())  # unique parameters
    info = {}
    rx = G.compute_records(net, X, method=method, info=info)
    ry = G.compute_records(net, X2, method=method)
    assert info["engine"] in ("structured", "vmap", "autograd") and info["reason"]
    assert_rel_close(G.flatten(rx), J, rtol=_tol(dtype))
    assert_rel_close(G.gram(ry, rx), torch.einsum("icp,jcp->ij", J2, J), rtol=_tol(dtype))
    assert_rel_close(G.gram(ry, rx, mode="full"), torch.einsum("icp,jdp->ijcd", J2, J),
                     rtol=_tol(dtype))
    assert_rel_close(G.self_gram(rx), (J**2).sum((1, 2)), rtol=_tol(dtype))


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_torchmodel_per_example_gradients(name, dtype):
    """TorchModel.per_example_gradients (loss at given labels), integer inputs included."""
    net = _build(name, dtype)
    X = _inputs(name, 6, dtype=dtype)
    y = np.array([0, 2, 1, 1, 0, 2])
    model = TorchModel(net, dtype=str(dtype)[6:])
    Gm = model.per_example_gradients(X, y)
    R = brute_force(net, X, fn=_ce, y=torch.as_tensor(y))[:, 0]
    assert_rel_close(Gm, R, rtol=_tol(dtype))


def _as(X, dtype):
    return X.to(dtype) if X.is_floating_point() else X  # token ids stay integers


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_trace_ntk_and_exact_trak(name, dtype):
    """TraceNTK and exact TRAK against the formulas on brute-force gradients."""
    net = _build(name, dtype)
    X, X2 = _inputs(name, 8, dtype=dtype), _inputs(name, 3, seed=2, dtype=dtype)
    # token ids (tied-lm, transformer) go in as integers, unconverted
    model = TorchModel(net, dtype=str(dtype)[6:])
    J, J2 = brute_force(net, _as(X, dtype)), brute_force(net, _as(X2, dtype))
    K = TraceNTK(model, normalize=False).fit(X).transform(X2)
    assert_rel_close(K, torch.einsum("icp,jcp->ij", J2, J), rtol=_tol(dtype) * 10)

    y, y2 = np.arange(8) % 3, np.array([1, 0, 2])
    if name == "tied-lm":  # V logits
        y, y2 = np.arange(8) % V, np.array([1, 7, 10])
    S = TRAK(model, projection_dim=None, ridge=0.1).fit(X, y).attribute(X2, y2)
    yt, y2t = torch.as_tensor(y), torch.as_tensor(y2)
    Phi = brute_force(net, _as(X, dtype), fn=_margin, y=yt)[:, 0].double()
    g = brute_force(net, _as(X2, dtype), fn=_margin, y=y2t)[:, 0].double()
    lam = 0.1 * (Phi**2).sum(1).mean()
    A = torch.linalg.inv(Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64))
    with torch.no_grad():
        p = torch.softmax(net(_as(X, dtype)).double(), 1)[torch.arange(len(y)), yt]
    ref = g @ A @ Phi.T * (1 - p)
    assert_rel_close(S, ref, rtol=1e-4 if dtype == torch.float32 else 1e-7)


# ----------------------------------------------------------------------------- item by item
def test_tied_weights_are_one_parameter():
    """Item 1: a tied weight counts once, its gradient summed over its uses, in every engine
    (before: structured gave the untied kernel, vmap raised KeyError)."""
    for name in ("tied-linear", "tied-lm"):
        net = _build(name, torch.float64)
        X = _inputs(name, 4)
        J = brute_force(net, X)
        for method in ("structured", "vmap"):
            recs = G.compute_records(net, X, method=method)
            assert_rel_close(G.flatten(recs), J, rtol=1e-10)
            assert_rel_close(G.gram(recs, recs), torch.einsum("icp,jcp->ij", J, J), rtol=1e-10)


def test_integer_inputs_keep_their_dtype():
    """Item 2: token ids stay integers through TorchModel (to_tensor, fit, gradients)."""
    net = _build("tied-lm", torch.float64)
    X = _inputs("tied-lm", 12)
    y = np.arange(12) % V
    model = TorchModel(net, dtype="float64")
    for inp in (X, X.numpy().astype(np.int32), X.numpy() > 4):
        assert not model.to_tensor(inp).is_floating_point()
    # whole-number floats (ids through check_array or pandas) fed straight to the embedding
    # are ids too
    assert torch.equal(model.to_tensor(X.numpy().astype(np.float32)), X)
    fitted = TorchModel(TiedLM(), dtype="float64", epochs=2, random_state=0).fit(X.numpy(), y)
    assert fitted.module_.dec.weight is fitted.module_.emb.weight
    Gm = fitted.per_example_gradients(X[:4], y[:4])
    R = brute_force(fitted.module_, X[:4], fn=_ce, y=torch.as_tensor(y[:4]))[:, 0]
    assert_rel_close(Gm, R, rtol=1e-10)
    info = {}
    G.compute_records(net, X, info=info)
    assert info["engine"] == "structured"  # nn.Embedding has a structured record
    # and through the estimators' input validation: integer ids as numpy arrays and tensors
    ids = X.numpy()
    K = TraceNTK(fitted, normalize=False).fit(ids).transform(ids[:3])
    R = brute_force(fitted.module_, X)
    assert_rel_close(K, torch.einsum("icp,jcp->ij", R[:3], R), rtol=1e-10)
    tr = TRAK(fitted, projection_dim=None).fit(X, y)
    assert tr.engine_["engine"] == "structured"
    assert np.isfinite(tr.attribute(ids[:2], y[:2])).all()


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recurrent_layers_fall_back_to_autograd(kind, dtype):
    """Item 3: recurrent layers take the per-example autograd engine, with the reason."""
    torch.manual_seed(0)
    net = RNNNet(kind).to(dtype).eval()
    X = _inputs("gru", 5, dtype=dtype)
    info = {}
    recs = G.compute_records(net, X, info=info)
    assert info["engine"] == "autograd" and kind in info["reason"]
    assert_rel_close(G.flatten(recs), brute_force(net, X), rtol=_tol(dtype))
    with pytest.raises(ValueError, match=kind):
        G.compute_records(net, X, method="structured")


def test_inplace_residual_blocks_take_the_structured_engine():
    """Item 4: in-place ReLU and ``out += identity`` stay on the structured engine."""
    net = _build("resnet", torch.float64)
    X = _inputs("resnet", 4)
    info = {}
    recs = G.compute_records(net, X, method="structured", info=info)
    assert info["engine"] == "structured"
    assert_rel_close(G.flatten(recs), brute_force(net, X), rtol=1e-10)


def test_memory_budget_chunks_and_refuses_one_example():
    """Item 5: a small budget chunks every engine with identical results; a budget below one
    example raises a clear MemoryError."""
    from skattr import _memory

    for name, method in (("resnet", "structured"), ("resnet", "vmap"), ("gru", "auto"),
                         ("tied-lm", "structured")):
        net = _build(name, torch.float64)
        X = _inputs(name, 9)
        info = {}
        full = G.compute_records(net, X, method=method, budget=2**40, info=info)
        assert info["chunk_size"] == 9 and info["n_chunks"] == 1
        per, fixed = info["bytes_per_example"], info["fixed_bytes"]
        # room for 3.5 examples: chunks of 3, records of 9 examples kept (deferred or not)
        small = G.compute_records(net, X, method=method, info=info,
                                  budget=int((fixed + 3.5 * per) / (1 - _memory.SLACK)))
        assert info["chunk_size"] == 3 and info["n_chunks"] == 3, (name, method, info)
        torch.testing.assert_close(G.flatten(small), G.flatten(full), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(G.gram(small, full), G.gram(full, full), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G.self_gram(small), G.self_gram(full), rtol=1e-12, atol=1e-12)
        with pytest.raises(MemoryError, match="one example"):
            G.compute_records(net, X, method=method, budget=fixed + per // 2)


def test_memory_budget_from_environment(monkeypatch):
    from skattr import _memory

    monkeypatch.setenv("SKATTR_MEMORY_BUDGET", "3MiB")
    assert _memory.memory_budget() == 3 * 2**20
    monkeypatch.setenv("SKATTR_MEMORY_BUDGET", "12345")
    assert _memory.memory_budget() == 12345
    assert _memory.memory_budget(777) == 777
    monkeypatch.setenv("SKATTR_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="SKATTR_MEMORY_BUDGET"):
        _memory.memory_budget()


def test_projected_records_stay_within_budget():
    """Projected features of records larger than the budget are computed chunk by chunk and
    equal the unchunked projection."""
    from skattr import _memory
    from skattr.projection import Projector

    net = _build("resnet", torch.float64)
    X = _inputs("resnet", 9)
    proj = Projector("gaussian", 16, 0, dtype=torch.float64)
    info = {}
    full = G.project(G.compute_records(net, X, method="vmap", budget=2**40, info=info), proj)
    recs = G.compute_records(net, X, method="vmap", info=info,
                             budget=int(2.5 * info["bytes_per_example"] / (1 - _memory.SLACK)))
    assert info["deferred"] and info["chunk_size"] == 2
    assert G.records_shape(recs) == (9, 3)
    torch.testing.assert_close(G.project(recs, proj), full, rtol=1e-12, atol=1e-12)


def test_engine_report():
    """Which engine ran and why, for each decision."""
    info = {}
    G.compute_records(_build("tied-linear", torch.float64), _inputs("tied-linear", 2), info=info)
    assert info["engine"] == "structured"
    G.compute_records(_build("transformer", torch.float64), _inputs("transformer", 2), info=info)
    assert info["engine"] == "vmap" and "MultiheadAttention" in info["reason"]
    G.compute_records(_build("resnet", torch.float64), _inputs("resnet", 2), method="vmap",
                      info=info)
    assert info["engine"] == "vmap" and "method='vmap'" in info["reason"]


class _RootParameter(nn.Module):
    """A Parameter held by the network itself (module name ""), scaling the input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(x * self.scale)


def test_engine_reason_names_the_root_module():
    """The network itself is named ``<root>`` in the engine's reason (before: an empty name,
    ": _RootParameter is not ..."); its gradients still equal the brute force."""
    torch.manual_seed(0)
    net, X = _RootParameter().eval(), _inputs("tied-linear", 3)
    info = {}
    recs = G.compute_records(net, X, info=info)
    assert info["engine"] == "vmap"
    assert info["reason"].startswith("<root>: _RootParameter is not a Linear")
    assert_rel_close(G.flatten(recs), brute_force(net, X), rtol=1e-10)
    with pytest.raises(ValueError, match="cannot handle this model: <root>: _RootParameter"):
        G.compute_records(net, X, method="structured")
