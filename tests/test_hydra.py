"""HYDRA against autograd through the whole unrolled training run.

The reference re-implements PyTorch's SGD (momentum, weight decay, the recorded learning rates
and batches) functionally with per-example loss weights ``w`` and differentiates ``theta_T``
with respect to ``w`` by ``torch.autograd.functional.jacobian``; it uses neither
``skattr.gradients`` nor ``skattr.hypergradients``.  Variants of the reference: exact (the
network's full second-order dependence), Hessian-free (the gradient of each step taken at a
detached ``theta_t``: only the explicit dependence on ``w``) and Gauss-Newton (the network
linearised at each ``theta_t``).
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.func import functional_call

from skattr import Callback, TorchModel, TrajectoryRecorder
from skattr import hypergradients as hg
from skattr.estimators.hydra import HYDRA
from skattr.training import TrainState

N, D_IN, C = 24, 4, 3


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D_IN))
    y = rng.integers(0, C, size=n)
    y[:C] = np.arange(C)
    return X, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _model(epochs=6, **kw):
    # 6 epochs x 3 steps (batch 8 of 24 plus a ragged last batch when n is not a multiple)
    params = dict(epochs=epochs, batch_size=8, lr=0.3, momentum=0.9, weight_decay=0.05,
                  lr_schedule="cosine", dtype="float64", random_state=0)
    params.update(kw)
    return TorchModel(_net(), **params)


def _recorded(X, y, **kw):
    m = _model(callbacks=[TrajectoryRecorder()], **kw).fit(X, y)
    return m, m.callbacks_[0]


# ------------------------------------------------------------------ the independent reference
def _unrolled_jacobian(net, rec, X, y, variant="exact", steps=None):
    """d theta_T / d w (p, n) by autograd through the unrolled SGD run of ``rec``."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [int(np.prod(s)) for s in shapes]
    sd = rec.checkpoints_[0][1]
    theta0 = torch.cat([sd[n].reshape(-1) for n in names]).double()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    mu, wd = rec.momentum_, rec.weight_decay_
    T = len(rec.batches_) if steps is None else steps

    def f(th, xb):
        parts = dict(zip(names, (t.view(s) for t, s in zip(torch.split(th, sizes), shapes))))
        return functional_call(net, parts, (xb,))

    def loss(z, yb, wb):
        return (wb * torch.nn.functional.cross_entropy(z, yb, reduction="none")).sum() / len(yb)

    def run(w):
        theta = theta0.clone().requires_grad_(True)
        buf = None
        for t in range(T):
            idx = torch.as_tensor(rec.batches_[t])
            xb, yb, wb = Xt[idx], yt[idx], w[idx]
            if variant == "exact":
                g = torch.autograd.grad(loss(f(theta, xb), yb, wb), theta, create_graph=True)[0]
            elif variant == "none":
                th = theta.detach().requires_grad_(True)
                g = torch.autograd.grad(loss(f(th, xb), yb, wb), th, create_graph=True)[0]
            else:  # Gauss-Newton: the network linearised at theta_t
                tb = theta.detach()
                J = torch.autograd.functional.jacobian(lambda p, xb=xb: f(p, xb), tb)  # (B, C, p)
                z = f(tb, xb).detach() + torch.einsum("bcp,p->bc", J, theta - tb)
                gz = torch.autograd.grad(loss(z, yb, wb), z, create_graph=True)[0]
                g = torch.einsum("bcp,bc->p", J, gz)
            g = g + wd * theta
            buf = g if buf is None else mu * buf + g
            theta = theta - rec.lrs_[t] * buf
        return theta

    return torch.autograd.functional.jacobian(run, torch.ones(len(X), dtype=torch.float64))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def run():
    X, y = _data()
    model, rec = _recorded(X, y)
    ref = {v: _unrolled_jacobian(_net(), rec, X, y, v).T.numpy() for v in ("exact", "none", "gauss-newton")}
    return X, y, model, rec, ref


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("hessian", ["exact", "none", "gauss-newton"])
def test_hypergradients_equal_unrolled_autograd(run, hessian):
    X, y, model, rec, ref = run
    h = HYDRA(_model(), hessian=hessian).fit(X, y)
    Dref = ref[hessian]
    assert len(rec.batches_) == 18 and len(set(rec.lrs_)) > 10  # a changing learning rate
    # every example, 1e-6 relative
    for i in range(N):
        assert _rel(h.hypergradients_[i], Dref[i]) < 1e-6, i
    # the trained network is the recorded one
    sd = h.model_.module_.state_dict()
    for k, v in model.module_.state_dict().items():
        torch.testing.assert_close(sd[k], v)


def test_hessian_free_differs_from_exact(run):
    X, y, _, _, ref = run
    err = _rel(ref["none"], ref["exact"])
    assert err > 1e-3  # the Hessian matters on this run
    assert _rel(ref["gauss-newton"], ref["exact"]) > 1e-4


def test_replay_equals_training(run):
    X, y, model, rec, _ = run
    a = HYDRA(_model(), hessian="exact").fit(X, y)
    b = HYDRA(_model(), hessian="exact", trajectory=rec).fit(X, y)
    np.testing.assert_allclose(b.hypergradients_, a.hypergradients_, rtol=1e-10, atol=1e-14)
    c = HYDRA(_model(), trajectory=rec).fit(X, y)
    d = HYDRA(_model()).fit(X, y)
    np.testing.assert_allclose(c.hypergradients_, d.hypergradients_, rtol=1e-10, atol=1e-14)
    assert c.replayed_ and not d.replayed_


class _WithUnused(nn.Module):
    """An MLP with a parameter the loss never reaches (no gradient: the optimizer skips it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(D_IN, 6), nn.ReLU(), nn.Linear(6, C))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_replay_reproduces_training_bitwise(dtype):
    """The replay's update (torch.optim's SGD update function, called directly) gives the
    trained parameters and momentum to the last bit, also with a parameter left without a
    gradient."""
    X, y = _data(40, seed=3)
    m = TorchModel(_WithUnused(), epochs=3, batch_size=16, lr=0.2, momentum=0.9, weight_decay=0.01,
                   lr_schedule="cosine", dtype=dtype, random_state=0, callbacks=[TrajectoryRecorder()]).fit(X, y)
    rec = m.callbacks_[0]
    fresh = clone(m).set_params(epochs=0, callbacks=None).fit(X, y)
    net = hg.replay(fresh, rec, fresh.to_tensor(X), fresh.encode_y(y, len(X)), None)
    for (k, a), b in zip(net.named_parameters(), m.module_.parameters()):
        assert torch.equal(a, b), k
    assert torch.equal(net.unused.weight, rec.checkpoints_[0][1]["unused.weight"])


def test_scores_sign_and_scale(run):
    """c_i(x) = -grad l(x, theta_T) . d_i, checked against a finite difference of the actual
    retraining with w_i = 1 - eps (the first-order increase of the test loss on removal)."""
    X, y, _, rec, ref = run
    h = HYDRA(_model(), hessian="exact").fit(X, y)
    Xq, yq = _data(5, seed=3)
    S = h.attribute(Xq, yq)
    assert S.shape == (5, N)
    # reference: grad of the test loss at theta_T (autograd) dotted with the autograd Jacobian
    net = h.model_.module_
    xt, ytq = torch.as_tensor(Xq), torch.as_tensor(yq)
    for j in range(5):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(xt[j : j + 1]), ytq[j : j + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
        np.testing.assert_allclose(S[j], -(ref["exact"] @ g), rtol=1e-6, atol=1e-12)
    # self-influence = -grad l_i(theta_T) . d_i
    si = h.self_influence()
    for i in (0, 7, 23):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.as_tensor(X[i : i + 1])), torch.as_tensor(y[i : i + 1])).backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
        np.testing.assert_allclose(si[i], -(ref["exact"][i] @ g), rtol=1e-6)
    assert np.mean(si > 0) > 0.8  # up-weighting an example lowers its own loss


def test_projected_equals_projection_of_full(run):
    X, y, *_ = run
    full = HYDRA(_model()).fit(X, y)
    Xq, yq = _data(6, seed=4)
    S_full = full.attribute(Xq, yq)
    errs = []
    for k in (8, 64, 1024):
        pr = HYDRA(_model(), projection_dim=k, random_state=1).fit(X, y)
        P = _projection_matrix(pr)
        # P d_i from the recursion on projected gradients == P applied to the full d_i
        np.testing.assert_allclose(pr.hypergradients_, full.hypergradients_ @ P.T, rtol=1e-6, atol=1e-10)
        errs.append(_rel(pr.attribute(Xq, yq), S_full))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.3, errs  # ~ 1/sqrt(k)


def _projection_matrix(h):
    """The fitted projection as a matrix (k, p), ``P / sqrt(k)``: least squares from the exact
    and projected per-example gradients of many random examples (they span parameter space)."""
    net = h.model_.network()
    rng = np.random.default_rng(7)
    Xr = torch.as_tensor(rng.normal(size=(400, D_IN)))
    yr = torch.as_tensor(rng.integers(0, C, 400))
    G = hg.GradientSource(h.model_, h.output_, None).features(net, Xr, yr).numpy()
    F = h._source_.features(net, Xr, yr).numpy()
    # the gradients span a subspace (softmax deltas sum to zero); every d_i lies in it, where
    # the minimum-norm solution acts as P
    return np.linalg.lstsq(G, F, rcond=None)[0].T


def test_lean_equals_vector(run):
    X, y, _, rec, _ = run
    Xq, yq = _data(5, seed=5)
    vec = HYDRA(_model()).fit(X, y)
    lean = HYDRA(_model(), mode="lean").fit(X, y, X_target=Xq, y_target=yq)
    np.testing.assert_allclose(lean.attribute(Xq, yq), vec.attribute(Xq, yq), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lean.self_influence(), vec.self_influence(), rtol=1e-6, atol=1e-12)
    # replaying a recorder in lean mode: the same
    lean2 = HYDRA(_model(), mode="lean", trajectory=rec).fit(X, y, X_target=Xq, y_target=yq)
    np.testing.assert_allclose(lean2.attribute(None), lean.attribute(None), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="only the targets given to fit"):
        lean.attribute(Xq[:2], yq[:2])


def _mean_target_gradient(net, Xq, yq):
    """Autograd gradient of the mean of the targets' losses at the network's parameters."""
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(torch.as_tensor(Xq)), torch.as_tensor(yq)).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()


@pytest.mark.parametrize("n_targets", [1, 2, 5])
def test_lean_mean_target_reduction(run, n_targets):
    """target_reduction="mean": one row, the mean of the per-target lean rows and
    -grad (1/m) sum_j l(x_j) . d_i with d_i from autograd through the unrolled run (1 target:
    both layers keep the targets' factors; 2: the first its factors, the second the dense mean
    matrix; 5: both the matrix)."""
    X, y, _, rec, ref = run
    Xq, yq = _data(max(n_targets, C), seed=5)
    Xq, yq = Xq[:n_targets], yq[:n_targets]
    full = HYDRA(_model(), mode="lean", trajectory=rec).fit(X, y, X_target=Xq, y_target=yq)
    mean = HYDRA(_model(), mode="lean", trajectory=rec, target_reduction="mean").fit(
        X, y, X_target=Xq, y_target=yq)
    S = mean.attribute(Xq, yq)
    assert S.shape == mean.lean_scores_.shape == (1, N)
    assert _rel(S[0], full.attribute(None).mean(0)) < 1e-10
    g = _mean_target_gradient(mean.model_.module_, Xq, yq)
    assert _rel(S[0], -(ref["none"] @ g)) < 1e-10
    np.testing.assert_array_equal(mean.attribute(None), S)
    np.testing.assert_allclose(mean.self_influence(), full.self_influence(), rtol=1e-12)
    with pytest.raises(ValueError, match="only the targets given to fit"):
        mean.attribute(X[:2], y[:2])


def test_lean_mean_target_reduction_cnn_and_subset():
    """Conv and LayerNorm records (the mean of the formed gradients), a tracked subset and no
    self-influence: the mean of the full-vector recursion's scores."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(16, 9)), rng.integers(0, C, 16)
    y[:C] = np.arange(C)
    kw = dict(epochs=2, batch_size=6, lr=0.2, momentum=0.9, weight_decay=0.01, lr_schedule="linear",
              dtype="float64", random_state=0)
    track = [15, 2, 7, 0]
    Xq, yq = X[:4] + 0.1, y[:4]
    vec = HYDRA(TorchModel(_cnn(), **kw), track=track).fit(X, y)
    lean = HYDRA(TorchModel(_cnn(), **kw), mode="lean", track=track, target_reduction="mean",
                 lean_self_influence=False).fit(X, y, X_target=Xq, y_target=yq)
    S, ref = lean.attribute(None), vec.attribute(Xq, yq).mean(0)
    assert S.shape == (1, 16)
    assert np.isnan(S[0, np.setdiff1d(np.arange(16), track)]).all()
    assert _rel(S[0, track], ref[track]) < 1e-10
    with pytest.raises(ValueError, match="lean_self_influence=False"):
        lean.self_influence()


def test_lean_without_self_influence(run):
    X, y, _, rec, _ = run
    Xq, yq = _data(5, seed=5)
    a = HYDRA(_model(), mode="lean", trajectory=rec).fit(X, y, X_target=Xq, y_target=yq)
    b = HYDRA(_model(), mode="lean", trajectory=rec, lean_self_influence=False).fit(
        X, y, X_target=Xq, y_target=yq)
    np.testing.assert_array_equal(b.attribute(None), a.attribute(None))
    with pytest.raises(ValueError, match="self-influence was not computed"):
        b.self_influence()


def test_target_reduction_and_self_influence_need_lean_mode(run):
    X, y, *_ = run
    with pytest.raises(ValueError, match="target_reduction='mean' is for mode='lean'"):
        HYDRA(_model(), target_reduction="mean").fit(X, y)
    with pytest.raises(ValueError, match="lean_self_influence=False is for mode='lean'"):
        HYDRA(_model(), lean_self_influence=False).fit(X, y)
    with pytest.raises(ValueError, match="target_reduction"):
        HYDRA(_model(), mode="lean", target_reduction="sum").fit(X, y, X_target=X[:2])
    with pytest.raises(ValueError, match="lean_self_influence"):
        HYDRA(_model(), mode="lean", lean_self_influence="no").fit(X, y, X_target=X[:2])
    with pytest.raises(ValueError, match="reduction must be"):
        hg.LeanRecursion(None, [0], 1, [0.0], None, reduction="max")


@pytest.mark.parametrize("bias", [True, False])
def test_lean_buffers_flush_within_the_replay(run, monkeypatch, bias):
    """The lean replay's reused buffers, flushed every few rows (steps split across flushes),
    with and without a bias, on a tracked subset: the same as the full-vector recursion."""
    X, y, *_ = run
    Xq, yq = _data(5, seed=5)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, 5, bias=bias), nn.Tanh(), nn.Linear(5, C, bias=bias)).double()

    params = dict(epochs=6, batch_size=8, lr=0.3, momentum=0.9, weight_decay=0.05,
                  lr_schedule="cosine", dtype="float64", random_state=0)
    track = [20, 3, 0, 17, 9, 11]
    vec = HYDRA(TorchModel(net(), **params), track=track).fit(X, y)
    monkeypatch.setattr(hg.LeanRecursion, "flush_rows", 5)
    lean = HYDRA(TorchModel(net(), **params), mode="lean", track=track).fit(X, y, X_target=Xq, y_target=yq)
    np.testing.assert_allclose(lean.attribute(None), vec.attribute(Xq, yq), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lean.self_influence(), vec.self_influence(), rtol=1e-6, atol=1e-12)


def test_lean_coefficients_closed_form():
    # mu = lambda = 0: a_t = -eta_t (plain SGD: d_i = -sum eta_t / B grad l_i)
    np.testing.assert_allclose(hg.lean_coefficients([0.1, 0.2, 0.3], 0.0, 0.0), [-0.1, -0.2, -0.3])
    # momentum only, constant lr: an injection at step t moves theta by -eta (1 + mu + ... + mu^(T-1-t))
    a = hg.lean_coefficients([0.1] * 4, 0.5, 0.0)
    np.testing.assert_allclose(a, [-0.1 * sum(0.5**j for j in range(4 - t)) for t in range(4)])


def test_tracked_subset(run):
    X, y, *_ = run
    full = HYDRA(_model(), hessian="exact").fit(X, y)
    sub = HYDRA(_model(), hessian="exact", track=[3, 0, 17]).fit(X, y)
    np.testing.assert_allclose(sub.hypergradients_, full.hypergradients_[[3, 0, 17]], rtol=1e-10)
    S = sub.attribute(X[:2], y[:2])
    assert np.isnan(S[:, 1]).all() and np.isfinite(S[:, [0, 3, 17]]).all()
    sub2 = HYDRA(_model(), projection_dim=16, track=[3, 0, 17]).fit(X, y)
    full2 = HYDRA(_model(), projection_dim=16).fit(X, y)
    np.testing.assert_allclose(sub2.hypergradients_, full2.hypergradients_[[3, 0, 17]], rtol=1e-10)


def test_ragged_batches_and_constant_lr():
    X, y = _data(21)  # batches of 8, 8, 5
    m = _model(epochs=3, lr_schedule=None, callbacks=[TrajectoryRecorder()]).fit(X, y)
    rec = m.callbacks_[0]
    ref = _unrolled_jacobian(_net(), rec, X, y, "exact").T.numpy()
    h = HYDRA(_model(epochs=3, lr_schedule=None), hessian="exact").fit(X, y)
    assert _rel(h.hypergradients_, ref) < 1e-6


# ------------------------------------------------------------------ bad input
def test_refuses_optimizer_it_cannot_follow(run):
    X, y, _, rec, _ = run
    bad = copy.deepcopy(rec)
    g = bad.optimizer_states_[0]["param_groups"][0]
    g.pop("momentum")
    g.pop("dampening")
    g["betas"] = (0.9, 0.999)
    with pytest.raises(ValueError, match="Adam"):
        HYDRA(_model(), trajectory=bad).fit(X, y)
    nest = copy.deepcopy(rec)
    nest.optimizer_states_[0]["param_groups"][0]["nesterov"] = True
    with pytest.raises(ValueError, match="nesterov"):
        HYDRA(_model(), trajectory=nest).fit(X, y)
    with pytest.raises(ValueError, match="Adam"):
        hg.check_sgd_optimizer(torch.optim.Adam(_net().parameters()))


def test_refuses_replay_on_other_data_or_architecture(run):
    X, y, _, rec, _ = run
    X2 = X.copy()
    X2[5] += 1.0
    with pytest.raises(ValueError, match="differ"):
        HYDRA(_model(), trajectory=rec).fit(X2, y)
    with pytest.raises(ValueError, match="recorded on 24 training examples"):
        HYDRA(_model(), trajectory=rec).fit(X[:20], y[:20])
    other = TorchModel(nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C)).double(),
                       epochs=1, dtype="float64", random_state=0)
    with pytest.raises(ValueError, match="architecture"):
        HYDRA(other, trajectory=rec).fit(X, y)


def test_refuses_bad_track_and_config(run):
    X, y, *_ = run
    with pytest.raises(ValueError, match="outside the training set"):
        HYDRA(_model(), track=[0, N]).fit(X, y)
    with pytest.raises(ValueError, match="outside the training set"):
        HYDRA(_model(), track=[-1]).fit(X, y)
    with pytest.raises(ValueError, match="projection_dim must be None"):
        HYDRA(_model(), hessian="exact", projection_dim=8).fit(X, y)
    with pytest.raises(ValueError, match="X_target"):
        HYDRA(_model(), mode="lean").fit(X, y)
    with pytest.raises(ValueError, match="BatchNorm"):
        net = nn.Sequential(nn.Linear(D_IN, 5), nn.BatchNorm1d(5), nn.Linear(5, C))
        HYDRA(TorchModel(net, epochs=1)).fit(X, y)


def test_diverging_run_raises():
    X, y = _data()
    with pytest.raises(FloatingPointError, match="step"):
        HYDRA(_model(lr=1e150, lr_schedule=None)).fit(X, y)
    m, rec = _recorded(X, y)
    bad = copy.deepcopy(rec)
    bad.lrs_ = [1e150] * len(bad.lrs_)
    bad.losses_, bad.checkpoints_ = [], bad.checkpoints_[:1]  # nothing to check it against
    with pytest.raises(FloatingPointError, match="diverged"):
        HYDRA(_model(), trajectory=bad).fit(X, y)


def test_diverging_hypergradients_raise(monkeypatch):
    X, y = _data()
    orig = hg.DenseRecursion.step

    def step(self, *a):
        orig(self, *a)
        self.D[0, 0] = float("nan")

    monkeypatch.setattr(hg.DenseRecursion, "step", step)
    with pytest.raises(FloatingPointError, match="hypergradients"):
        HYDRA(_model(epochs=1), hessian="exact").fit(X, y)


# ------------------------------------------------------------------ sklearn
def test_clone_pickle_round_trip(run):
    X, y, *_ = run
    h = HYDRA(_model(), projection_dim=16).fit(X, y)
    c = clone(h)
    assert not hasattr(c, "model_") and c.get_params()["projection_dim"] == 16
    h2 = pickle.loads(pickle.dumps(h))
    np.testing.assert_allclose(h2.attribute(X[:3], y[:3]), h.attribute(X[:3], y[:3]))
    np.testing.assert_allclose(clone(h).fit(X, y).attribute(X[:3], y[:3]), h.attribute(X[:3], y[:3]))
    # the lean mean objective without self-influence: parameters and scores survive both
    Xq, yq = X[:4], y[:4]
    h = HYDRA(_model(), mode="lean", target_reduction="mean", lean_self_influence=False).fit(
        X, y, X_target=Xq, y_target=yq)
    c = clone(h)
    p = c.get_params()
    assert p["target_reduction"] == "mean" and p["lean_self_influence"] is False
    h2 = pickle.loads(pickle.dumps(h))
    assert h2.target_reduction == "mean" and h2.lean_self_influence is False
    np.testing.assert_array_equal(h2.attribute(Xq, yq), h.attribute(Xq, yq))
    np.testing.assert_allclose(c.fit(X, y, X_target=Xq, y_target=yq).attribute(None),
                               h.attribute(None), rtol=1e-12)


def _lazy_model(**kw):
    net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    params = dict(dtype="float64", random_state=0, epochs=3, batch_size=16, lr=0.1, weight_decay=0.01)
    params.update(kw)
    return TorchModel(net, **params)


_TORCH_HASH = (
    "joblib.hash of a torch tensor pickles its storage key (its memory address), so the "
    "check's deep copy of the module hashes differently although fit leaves it untouched."
)
_FOUR_LABELS = (
    "the check's y has 4 labels; the loss of a 3-logit network is defined for labels 0..2 only, "
    "so fit raises a ValueError naming the labels and the classes."
)


@parametrize_with_checks([HYDRA(_lazy_model(), projection_dim=16)],
                         expected_failed_checks=lambda est: {
                             "check_estimators_overwrite_params": _TORCH_HASH,
                             "check_dtype_object": _FOUR_LABELS},
                         xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_fused_capture_equals_separate_pass(run, monkeypatch):
    """Per-example gradients from the training step's own backward pass == a separate pass."""
    X, y, _, rec, _ = run
    Xq, yq = _data(4, seed=6)
    a = HYDRA(_model(), projection_dim=32).fit(X, y)
    lean_a = HYDRA(_model(), mode="lean", trajectory=rec).fit(X, y, X_target=Xq, y_target=yq)
    monkeypatch.setattr(hg, "FUSED", False)
    b = HYDRA(_model(), projection_dim=32).fit(X, y)
    lean_b = HYDRA(_model(), mode="lean", trajectory=rec).fit(X, y, X_target=Xq, y_target=yq)
    np.testing.assert_allclose(a.hypergradients_, b.hypergradients_, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(lean_a.attribute(None), lean_b.attribute(None), rtol=1e-10, atol=1e-15)


def test_lazy_scheme_equals_closed_form(run):
    """The authors' lazy forward scheme (2x2 step matrices applied on an example's next
    appearance) == the closed form with backward-computed coefficients."""
    X, y, _, rec, ref = run
    h = HYDRA(_model(), projection_dim=16, trajectory=rec).fit(X, y)
    m = h.model_
    Xt, yt = m.to_tensor(X), m.encode_y(y, N)
    lazy = hg.LazyRecursion(h._source_, np.arange(N), N, rec.momentum_, rec.weight_decay_, 16, "cpu")
    fresh = clone(m).set_params(epochs=0).fit(X, y)
    hook = hg.RecursionHook(lazy, h._source_, Xt, yt, fresh.module_)
    hg.replay(fresh, rec, Xt, yt, hook)
    np.testing.assert_allclose(lazy.finish().numpy(), h.hypergradients_, rtol=1e-9, atol=1e-14)


def test_docs_examples_run(tmp_path, monkeypatch):
    """The ```python blocks of docs/hydra.md run as written (one namespace, in order)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "hydra.md").read_text()
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns = {}
    for b in blocks:
        exec(compile(b, "docs/hydra.md", "exec"), ns)  # noqa: S102


# ------------------------------------------------------------------ mislabel-detection metrics
def test_detection_curve_against_brute_force():
    from skattr.metrics import mislabel_detection_curve, precision_at_fraction, recall_at_fraction

    rng = np.random.default_rng(0)
    n = 57
    s = rng.normal(size=n)
    f = rng.random(n) < 0.2
    q, rec, prec = mislabel_detection_curve(s, f)
    assert q.shape == (n,) and rec[-1] == 1.0 and np.all(np.diff(rec) >= 0)
    for c in (1, 5, 6, 30, n):  # inspect the c highest scores by brute force
        top = sorted(range(n), key=lambda i: -s[i])[:c]
        assert prec[c - 1] == pytest.approx(f[top].mean())
        assert rec[c - 1] == pytest.approx(f[top].sum() / f.sum())
    top = sorted(range(n), key=lambda i: -s[i])[:6]  # ceil(0.1 * 57) = 6
    assert precision_at_fraction(s, f, 0.1) == pytest.approx(f[top].mean())
    assert recall_at_fraction(s, f, 0.1) == pytest.approx(f[top].sum() / f.sum())
    # a perfect score finds every flipped label in the first f.sum() inspections
    assert recall_at_fraction(f.astype(float), f, f.sum() / n) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        precision_at_fraction(np.r_[s[:-1], np.nan], f)
    with pytest.raises(ValueError, match="fractions"):
        mislabel_detection_curve(s, f, [0.0])
    with pytest.raises(ValueError, match="no flipped"):
        mislabel_detection_curve(s, np.zeros(n, bool))


class _Img(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 1, 3, 3)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(_Img(), nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.LayerNorm(8),
                         nn.Linear(8, C)).double()


@pytest.mark.parametrize("hessian", ["none", "exact"])
def test_cnn_equals_unrolled_autograd(hessian):
    """Conv and LayerNorm layers: the per-example gradients read off the training step
    (unfolded patches, normalised inputs) and the curvature products, against autograd."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(16, 9)), rng.integers(0, C, 16)
    y[:C] = np.arange(C)
    kw = dict(epochs=3, batch_size=6, lr=0.2, momentum=0.9, weight_decay=0.01, lr_schedule="linear",
              dtype="float64", random_state=0)
    m = TorchModel(_cnn(), callbacks=[TrajectoryRecorder()], **kw).fit(X, y)
    ref = _unrolled_jacobian(_cnn(), m.callbacks_[0], X, y, hessian).T.numpy()
    h = HYDRA(TorchModel(_cnn(), **kw), hessian=hessian).fit(X, y)
    assert _rel(h.hypergradients_, ref) < 1e-6
    if hessian == "none":
        Xq, yq = X[:4] + 0.1, y[:4]
        lean = HYDRA(TorchModel(_cnn(), **kw), mode="lean").fit(X, y, X_target=Xq, y_target=yq)
        np.testing.assert_allclose(lean.attribute(None), h.attribute(Xq, yq), rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ retrain without suspects
def _flipped_line():
    """1-D two-class data separable at 0 (gap (-0.1, 0.1)); every third class-0 point is
    flipped to class 1, which drags a linear boundary to the left: without the flipped points
    the data are separable again and every test point (|x| >= 0.2) is classified right."""
    x0, x1 = np.linspace(-2, -0.1, 40), np.linspace(0.1, 2, 40)
    X = np.r_[x0, x1][:, None].astype("float32")
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    flipped = np.zeros(80, bool)
    flipped[:40:3] = True
    y[flipped] = 1
    Xt = np.r_[np.linspace(-2, -0.2, 50), np.linspace(0.2, 2, 50)][:, None].astype("float32")
    return X, y, flipped, Xt, (Xt[:, 0] > 0).astype(int)


def test_retrain_without_suspects_against_explicit_retraining():
    from skattr.metrics import retrain_without_suspects

    X, y, flipped, Xt, yt = _flipped_line()
    model = TorchModel(nn.Linear(1, 2), epochs=30, batch_size=80, lr=1.0, momentum=0.9,
                       random_state=0)
    q = int(flipped.sum())  # 14
    scores = flipped + 0.01 * np.arange(80)  # flipped first, then the rest by index
    res = retrain_without_suspects(model, X, y, scores, [q, 20], X_test=Xt, y_test=yt,
                                   n_seeds=2, random_state=3)
    np.testing.assert_array_equal(res["k"], [q, 20])
    np.testing.assert_array_equal(res["seeds"], [3, 4])
    np.testing.assert_array_equal(res["removed"][0], np.flatnonzero(flipped))
    np.testing.assert_array_equal(res["removed"][1], np.sort(np.argsort(-scores)[:20]))
    for c, kk in enumerate((q, 20)):  # the random controls: k distinct points, nested in k
        r = res["removed_random"][c]
        assert r.shape == (2, kk) and all(len(set(row)) == kk for row in r)
    assert set(res["removed_random"][0][0]) <= set(res["removed_random"][1][0])

    def explicit(keep, seed):  # an independent retrain: clone, seed, fit, evaluate
        m = clone(model).set_params(random_state=seed).fit(X[keep], y[keep])
        with torch.no_grad():
            z = m.module_(torch.as_tensor(Xt))
        loss = torch.nn.functional.cross_entropy(z, torch.as_tensor(yt)).item()
        return float((z.argmax(1).numpy() == yt).mean()), loss

    for j, seed in enumerate((3, 4)):
        keep_sets = {"all": np.arange(80)}
        for c in range(2):
            keep_sets[("suspects", c)] = np.setdiff1d(np.arange(80), res["removed"][c])
            keep_sets[("random", c)] = np.setdiff1d(np.arange(80), res["removed_random"][c][j])
        for key, keep in keep_sets.items():
            acc, loss = explicit(keep, seed)
            what = "all" if key == "all" else key[0]
            got_acc = res[f"score_{what}"][j] if key == "all" else res[f"score_{what}"][key[1], j]
            got_loss = res[f"loss_{what}"][j] if key == "all" else res[f"loss_{what}"][key[1], j]
            assert got_acc == acc
            assert got_loss == pytest.approx(loss, rel=1e-5)
    # the constructed property: removing exactly the flipped labels restores a perfect
    # classifier; the noisy set and removing as many random points do not
    np.testing.assert_array_equal(res["score_suspects"][0], [1.0, 1.0])
    assert np.all(res["score_all"] < 1.0) and np.all(res["score_random"][0] < 1.0)
    assert res["score_change_suspects"][0] > res["score_change_random"][0] > -1
    assert res["score_change_suspects"][0] == pytest.approx(np.mean(1.0 - res["score_all"]))
    assert np.all(res["loss_suspects"][0] < res["loss_all"])
    # bad input
    with pytest.raises(ValueError, match="scores has 79 entries"):
        retrain_without_suspects(model, X, y, scores[1:], q, X_test=Xt, y_test=yt)
    with pytest.raises(ValueError, match="NaN"):
        retrain_without_suspects(model, X, y, np.r_[scores[1:], np.nan], q, X_test=Xt, y_test=yt)
    with pytest.raises(ValueError, match=r"k must lie in \[1, n_train - 1\]"):
        retrain_without_suspects(model, X, y, scores, [0, 5], X_test=Xt, y_test=yt)
    with pytest.raises(ValueError, match="k must be an integer"):
        retrain_without_suspects(model, X, y, scores, 0.1, X_test=Xt, y_test=yt)
    with pytest.raises(TypeError, match="TorchModel"):
        retrain_without_suspects(nn.Linear(1, 2), X, y, scores, q, X_test=Xt, y_test=yt)


def test_hydra_uses_only_public_names_of_the_core():
    """HYDRA reads the core through public names (gradients.selected_modules, layer_records,
    has_tied_parameters; training.learning_rate_at), never its private helpers."""
    import re
    from pathlib import Path

    from skattr import gradients, training

    root = Path(hg.__file__).parent
    for path in (root / "hypergradients.py", root / "estimators" / "hydra.py"):
        src = path.read_text()
        assert not re.findall(r"_grad\._\w+", src), path
        assert not re.findall(r"from \.+training import [^\n]*\b_\w+", src), path
    for name in ("selected_modules", "has_tied_parameters", "layer_records"):
        assert name in gradients.__all__
    assert "learning_rate_at" in training.__all__
    assert training.learning_rate_at(0.2, "cosine", 5, 10) == pytest.approx(0.1)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    sel = gradients.selected_modules(net, None)
    assert list(sel) == ["0", "1"] and not gradients.has_tied_parameters(sel)
    net[1].weight = nn.Parameter(net[0].weight[:2].detach().clone())
    assert not gradients.has_tied_parameters(gradients.selected_modules(net, None))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight  # one Parameter under two names
    assert gradients.has_tied_parameters(gradients.selected_modules(tied, None))


# ------------------------------------------------------------------ new-user trial (issue 11)
class _Plan(Callback):
    """Seeded batches of 8, optionally with loss weights (3 on even indices, 1 on odd)."""

    def __init__(self, weights=None):
        self.weights = weights

    def plan_epoch(self, state, generator):
        perm = torch.randperm(state.n_train, generator=generator).numpy()
        out = []
        for s in range(0, state.n_train, 8):
            b = perm[s : s + 8]
            if self.weights is None:
                out.append(b)
            elif self.weights == "even":
                out.append((b, np.where(b % 2 == 0, 3.0, 1.0)))
            else:
                out.append((b, np.full(len(b), float(self.weights))))
        return out


def test_weighted_batches_refused_and_recorded():
    X, y = _data()
    for kw in ({}, {"hessian": "exact"}, {"projection_dim": 8}):
        with pytest.raises(ValueError, match="plan_epoch"):
            HYDRA(_model(epochs=2, callbacks=[_Plan("even")]), **kw).fit(X, y)
    with pytest.raises(ValueError, match="weighted batches"):
        HYDRA(_model(epochs=2, callbacks=[_Plan("even")]), mode="lean").fit(X, y, X_target=X[:2])
    m = _model(epochs=2, callbacks=[_Plan("even"), TrajectoryRecorder()]).fit(X, y)
    rec = m.callbacks_[1]
    assert len(rec.batch_weights_) == len(rec.batches_) == 6
    for b, w in zip(rec.batches_, rec.batch_weights_):
        np.testing.assert_array_equal(w, np.where(b % 2 == 0, 3.0, 1.0))
    with pytest.raises(ValueError, match="plan_epoch"):
        HYDRA(_model(epochs=2), trajectory=rec).fit(X, y)
    # equal weights leave the mean: the same hypergradients as the unweighted plan
    plain = HYDRA(_model(epochs=2, callbacks=[_Plan()]), hessian="exact").fit(X, y)
    equal = HYDRA(_model(epochs=2, callbacks=[_Plan(2.0)]), hessian="exact").fit(X, y)
    assert _rel(equal.hypergradients_, plain.hypergradients_) < 1e-12
    assert _model(epochs=1, callbacks=[TrajectoryRecorder()]).fit(X, y).callbacks_[0].batch_weights_ == [None] * 3


def test_recorder_with_adam_then_hydra_refuses():
    X, y = _data()
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    rec = TrajectoryRecorder()
    st = TrainState(module=net, optimizer=opt, n_train=N, batch_size=8, total_steps=3, lr=0.01)
    rec.on_train_begin(st)  # raised KeyError('momentum') before
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for t in range(3):
        st.batch_indices = np.arange(8 * t, 8 * t + 8)
        loss = torch.nn.functional.cross_entropy(net(Xt[st.batch_indices]), yt[st.batch_indices])
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.step, st.loss = st.step + 1, float(loss.detach())
        rec.on_batch_end(st)
    rec.on_epoch_end(st)
    assert rec.optimizer_ == "Adam" and rec.momentum_ is None and len(rec.checkpoints_) == 2
    with pytest.raises(ValueError, match=r"torch\.optim\.SGD only \(momentum, weight decay") as e:
        HYDRA(_model(epochs=1), trajectory=rec).fit(X, y)
    assert "Adam" in str(e.value)


def test_warns_when_model_is_fitted_or_recipe_differs_from_recording():
    X, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HYDRA(_model(epochs=1)).fit(X, y)  # unfitted: no warning
        m, rec = _recorded(X, y, epochs=2)
        HYDRA(_model(epochs=2), trajectory=rec).fit(X, y)  # same recipe: no warning
    with pytest.warns(UserWarning, match="already fitted.*TrajectoryRecorder.*trajectory="):
        HYDRA(_model(epochs=1).fit(X, y)).fit(X, y)
    with pytest.warns(UserWarning, match=r"recorded run.*momentum 0\.5 \(recorded 0\.9\).*epochs 3"):
        h = HYDRA(_model(epochs=3, momentum=0.5), trajectory=rec).fit(X, y)
    for k, v in m.module_.state_dict().items():  # the recording is what was followed
        torch.testing.assert_close(h.model_.module_.state_dict()[k], v)
    with pytest.warns(UserWarning, match="lr 0.1"):
        HYDRA(_model(epochs=2, lr=0.1), trajectory=rec).fit(X, y)
    # another batch size with the recorded number of steps at the recorded one
    with pytest.warns(UserWarning, match=r"batch_size 16 \(recorded 8\)"):
        HYDRA(_model(epochs=2, batch_size=16), trajectory=rec).fit(X, y)


def test_own_prediction_with_vanishing_loss_gradient_raises():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, D_IN))
    yr = X @ rng.normal(size=D_IN)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Dropout(p=0.0), nn.Linear(5, 1))  # p=0: identity
    m = TorchModel(net, task="regression", epochs=2, batch_size=8, dtype="float64", random_state=0)
    h = HYDRA(m).fit(X, yr)
    for f in (lambda: h.attribute(X[:3]), lambda: h.transform(X[:3])):
        with pytest.raises(ValueError, match="own prediction.*pass the targets|Pass the targets"):
            f()
    with pytest.raises(ValueError, match="y_target"):
        HYDRA(m, mode="lean").fit(X, yr, X_target=X[:3])
    S = h.attribute(X[:3], yr[:3])  # with y: the scores, not zeros
    assert np.abs(S).max() > 0
    # classification at its own prediction: the cross-entropy's gradient is not zero
    X, y = _data()
    h = HYDRA(_model(epochs=1)).fit(X, y)
    pred = h.model_.predict(X[:3])
    np.testing.assert_allclose(h.transform(X[:3]), h.attribute(X[:3], pred), rtol=1e-12)
    with pytest.raises(ValueError, match=r"Dropout\(p=0\.5"):
        net = nn.Sequential(nn.Linear(D_IN, 5), nn.Dropout(p=0.5), nn.Linear(5, C))
        HYDRA(TorchModel(net, epochs=1)).fit(X, y)


def test_full_vector_flush_equals_projection_path_bitwise(monkeypatch):
    """The full-vector flush (outer products added into D's columns, in reused row blocks)
    gives the bits of ``source.project`` on the buffered records (float32 network, repeated
    rows in one flush, a layer without bias, several row blocks)."""
    X, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C, bias=False))
    model = TorchModel(net, epochs=4, batch_size=8, lr=0.3, momentum=0.9, weight_decay=0.05,
                       lr_schedule="cosine", random_state=0)
    from skattr.gradients import KronRecord

    monkeypatch.setattr(hg.ClosedFormRecursion, "flush_rows", 40)
    monkeypatch.setattr(hg.ClosedFormRecursion, "flat_block", 100)  # blocks of 3 rows
    new = HYDRA(model).fit(X, y)

    def old(self, n):
        recs = [KronRecord(key, xb[:n], db[:n], False) for key, xb, db in self._recs]
        self.D.index_add_(0, self._rows[:n], self.source.project(recs))

    monkeypatch.setattr(hg.ClosedFormRecursion, "_flush_flat", old)
    ref = HYDRA(model).fit(X, y)
    assert new.hypergradients_.dtype == np.float64 and np.abs(new.hypergradients_).max() > 0
    np.testing.assert_array_equal(new.hypergradients_, ref.hypergradients_)
    np.testing.assert_array_equal(new.self_influence(), ref.self_influence())


@pytest.mark.parametrize("inplace", [False, True])
def test_engine_says_where_the_step_gradients_came_from(inplace, capsys):
    """engine_ names the path: the step's own pass, or a second pass and why (an in-place ReLU
    here); both give the same hypergradients, and verbose=1 prints it."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 5)).astype("float32")
    y = (X[:, 0] > 0).astype(int)

    def fit(inpl, **kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=inpl), nn.Linear(8, 2))
        return HYDRA(TorchModel(net, epochs=2, batch_size=8, random_state=0), **kw).fit(X, y)

    h = fit(inplace, verbose=1)
    assert h.engine_["engine"] == ("separate pass" if inplace else "step capture")
    assert ("in-place" in h.engine_["reason"]) == inplace
    assert f"gradient engine {h.engine_['engine']!r}" in capsys.readouterr().out
    np.testing.assert_allclose(h.hypergradients_, fit(not inplace).hypergradients_, rtol=1e-5,
                               atol=1e-7)
    assert fit(inplace, hessian="exact", track=[0, 1]).engine_["engine"] == "curvature"
