"""InfluenceFunction: against brute-force autograd/numpy references, hand-built EK-FAC factors,
leave-one-out retraining, the projection's own map; sklearn round trips; bad input."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close, input_for, make_cnn, make_mlp, ref_jacobian
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

from skattr import TorchModel
from skattr import gradients as G
from skattr.estimators.influence import InfluenceFunction
from skattr.featurize import Featurizer
from skattr.hessian import ParamSpace, project_like
from skattr.outputs import LossOutput
from skattr.projection import KINDS, Projector

pytestmark = pytest.mark.filterwarnings("ignore:H \\+ damping I is not positive definite")


# ----------------------------------------------------------------------------- references
def ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def ref_grads(net, X, y):
    """Per-example loss gradients (n, D), named_parameters order (jacrev, one example at a time)."""
    return ref_jacobian(net, X, fn=ce, y=torch.as_tensor(y))[:, 0].numpy()


def ref_hessian(net, X, y):
    """Hessian (D, D) of the mean cross-entropy, torch.autograd.functional.hessian on a flat vector."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    buffers = dict(net.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def mean_loss(t):
        ps, off = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            ps[n] = t[off : off + k].view(s)
            off += k
        z = torch.func.functional_call(net, {**ps, **buffers}, (Xt,))
        return ce(z, yt).mean()

    return torch.autograd.functional.hessian(mean_loss, theta, vectorize=True).numpy()


def ref_scores(net, Xtr, ytr, Xte, yte, damping):
    Gtr, Gte = ref_grads(net, Xtr, ytr), ref_grads(net, Xte, yte)
    H = ref_hessian(net, Xtr, ytr)
    M = np.linalg.inv(H + damping * np.eye(H.shape[0]))
    return Gte @ M @ Gtr.T, np.einsum("ip,pq,iq->i", Gtr, M, Gtr), (Gte, Gtr, M)


def predicted(net, X):
    with torch.no_grad():
        return net(torch.as_tensor(X)).argmax(1).numpy()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(36, 5))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 0.8)
    return X[:30], y[:30], X[30:], y[30:]


@pytest.fixture(scope="module")
def trained(data):
    Xtr, ytr, _, _ = data
    model = TorchModel(make_mlp(), epochs=60, lr=0.1, batch_size=10, dtype="float64", random_state=0)
    return model.fit(Xtr, ytr)


@pytest.fixture(scope="module")
def exact_fit(trained, data):
    Xtr, ytr, _, _ = data
    return InfluenceFunction(trained, solver="exact", damping=0.05).fit(Xtr, ytr)


def cnn_model():
    return TorchModel(make_cnn(), dtype="float64")


# ----------------------------------------------------------------------------- exact = numpy
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_equals_numpy_formula(kind, trained, data):
    if kind == "mlp":
        model = trained
        Xtr, ytr, Xte, yte = data
    else:  # Conv, BatchNorm (eval), LayerNorm, Linear: Kronecker and dense records
        model = cnn_model()
        X = input_for("cnn", 16)
        y = np.arange(16) % 3
        Xtr, ytr, Xte, yte = X[:12], y[:12], X[12:], y[12:]
    damping = 0.05
    inf = InfluenceFunction(model, solver="exact", damping=damping).fit(Xtr, ytr)
    S, self_ref, (_, _, M) = ref_scores(model.network(), Xtr, ytr, Xte, yte, damping)
    assert_rel_close(inf.attribute(Xte, yte), S, rtol=1e-6)
    assert_rel_close(inf.self_influence(), self_ref, rtol=1e-6)
    # the kernel: the same quadratic form at the predicted labels, on both sides
    Gp = ref_grads(model.network(), Xte, predicted(model.network(), Xte))
    assert_rel_close(inf.kernel(Xte), Gp @ M @ Gp.T, rtol=1e-6)
    H = ref_hessian(model.network(), Xtr, ytr)
    assert_rel_close(inf.hessian_eigenvalues_, np.linalg.eigvalsh(H), rtol=1e-8)


def test_sign_and_scale_match_leave_one_out():
    """Logistic regression at its (ridge-regularised) minimum: removing z_i raises the loss at x
    by about tau(x, z_i) / n, with damping = the ridge (the Hessian of the regularised loss)."""
    rng = np.random.default_rng(1)
    n, d, lam = 200, 3, 0.05
    X = rng.normal(size=(n + 4, d))
    y = (X @ np.array([1.5, -1.0, 0.5]) + 0.7 * rng.normal(size=n + 4) > 0).astype(int)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]

    def minimise(keep):
        """Newton's method in numpy on Theta = [W | b] (2, d + 1) of a Linear(d, 2)."""
        a = np.hstack([Xtr[keep], np.ones((len(keep), 1))])
        Y = np.eye(2)[ytr[keep]]
        T = np.zeros((2, d + 1))
        for _ in range(40):
            z = a @ T.T
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            # mean over the full-set size n: removing i is eps = -1/n in the mean loss
            g = (p - Y).T @ a / n + lam * T
            Hs = np.einsum("nc,ne,ni,nj->ciej", p, p, a, a)
            Hd = np.einsum("nc,ni,nj->cij", p, a, a)
            H = -Hs
            for c in range(2):
                H[c, :, c, :] += Hd[c]
            H = H.reshape(2 * (d + 1), -1) / n + lam * np.eye(2 * (d + 1))
            T = T - np.linalg.solve(H, g.ravel()).reshape(T.shape)
        assert np.abs(g).max() < 1e-12
        lin = torch.nn.Linear(d, 2).double()
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(T[:, :d]))
            lin.bias.copy_(torch.as_tensor(T[:, d]))
        return lin

    full = minimise(np.arange(n))
    inf = InfluenceFunction(TorchModel(full, dtype="float64"), damping=lam).fit(Xtr, ytr)
    S = inf.attribute(Xte, yte)
    with torch.no_grad():
        base = ce(full(torch.as_tensor(Xte)), torch.as_tensor(yte)).numpy()
    for i in range(6):
        loo = minimise(np.delete(np.arange(n), i))
        with torch.no_grad():
            delta = ce(loo(torch.as_tensor(Xte)), torch.as_tensor(yte)).numpy() - base
        np.testing.assert_allclose(delta, S[:, i] / n, rtol=0.1, atol=2e-3 * np.abs(S).max() / n)


# ----------------------------------------------------------------------------- projections
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_project_like_is_the_featurizers_map(kind, arch):
    """Projecting a record's own flat gradient with project_like equals gradients.project."""
    net = make_mlp() if arch == "mlp" else make_cnn()
    X = torch.as_tensor(input_for(arch, 6))
    y = torch.arange(6) % 3
    out = LossOutput()
    out.check(TorchModel(net, dtype="float64"))
    recs = G.compute_records(net, X, output=out, y=y)
    space = ParamSpace(net, recs)
    proj = Projector(kind, 300, 7, dtype=torch.float64)
    ref = G.project(recs, proj)[:, 0]
    got = project_like(proj, recs, space, G.flatten(recs)[:, 0], torch.zeros(6, 300, dtype=torch.float64))
    assert_rel_close(got, ref, rtol=1e-12)


@pytest.mark.parametrize("kind", ["kronecker", "factored", "gaussian"])
def test_projected_scores(kind, trained, data):
    """attribute = (P M g(x)) . (P g_i) / k with P the featuriser's own (explicit) map."""
    Xtr, ytr, Xte, yte = data
    k, damping = 64, 0.05
    inf = InfluenceFunction(trained, damping=damping, projection_dim=k, projection=kind).fit(Xtr, ytr)
    fz = inf._featurizer(0)
    net = trained.network()
    recs = fz.records(torch.as_tensor(Xtr[:1]), torch.as_tensor(ytr[:1]))
    D = inf.n_params_
    P = project_like(fz.projector(), recs, ParamSpace(net, recs), torch.eye(D, dtype=torch.float64),
                     torch.zeros(D, k, dtype=torch.float64)).numpy() / np.sqrt(k)  # (D, k)
    _, _, (Gte, Gtr, M) = ref_scores(net, Xtr, ytr, Xte, yte, damping)
    F_store = next(iter(inf._features.iter_blocks(0)))[2]
    assert_rel_close(F_store, Gtr @ P, rtol=1e-10)  # P is the training features' map
    assert_rel_close(inf.attribute(Xte, yte), (Gte @ M @ P) @ (Gtr @ P).T, rtol=1e-8)
    # self-influence stays exact under projection
    assert_rel_close(inf.self_influence(), np.einsum("ip,pq,iq->i", Gtr, M, Gtr), rtol=1e-8)


# ----------------------------------------------------------------------------- iterative solvers
def test_cg_and_lissa_converge_to_exact(trained, data, exact_fit):
    Xtr, ytr, Xte, yte = data
    S = exact_fit.attribute(Xte, yte)
    cg = InfluenceFunction(trained, solver="cg", damping=0.05, tol=1e-11, n_iter=500).fit(Xtr, ytr)
    assert_rel_close(cg.attribute(Xte, yte), S, rtol=1e-7)
    assert_rel_close(cg.self_influence(), exact_fit.self_influence(), rtol=1e-7)
    lam_max = exact_fit.hessian_eigenvalues_.max()
    li = InfluenceFunction(trained, solver="lissa", damping=0.5, tol=1e-9, n_iter=20000).fit(Xtr, ytr)
    assert 0.5 * (lam_max + 0.5) < li.lissa_scale_ <= lam_max + 0.5 + 1e-9
    ex = InfluenceFunction(trained, solver="exact", damping=0.5).fit(Xtr, ytr)
    assert_rel_close(li.attribute(Xte, yte), ex.attribute(Xte, yte), rtol=1e-6)
    # errors fall with iterations
    errs = []
    for it in (2, 8, 32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            c = InfluenceFunction(trained, solver="cg", damping=0.05, n_iter=it).fit(Xtr, ytr)
            errs.append(np.abs(c.attribute(Xte, yte) - S).max())
    assert errs[0] > errs[1] > errs[2]


def test_stochastic_lissa_is_seeded_and_close(trained, data):
    Xtr, ytr, Xte, yte = data
    kw = dict(solver="lissa", damping=1.0, n_iter=40, lissa_batch_size=10, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = InfluenceFunction(trained, **kw, random_state=1).fit(Xtr, ytr).attribute(Xte, yte)
        b = InfluenceFunction(trained, **kw, random_state=1).fit(Xtr, ytr).attribute(Xte, yte)
        c = InfluenceFunction(trained, **kw, random_state=2).fit(Xtr, ytr).attribute(Xte, yte)
    ex = InfluenceFunction(trained, damping=1.0).fit(Xtr, ytr).attribute(Xte, yte)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.corrcoef(a.ravel(), ex.ravel())[0, 1] > 0.95


# ----------------------------------------------------------------------------- EK-FAC
def test_ekfac_is_exact_for_a_linear_regression():
    """One Linear layer, half squared error: H = GGN = E[a a^T] (x) I, which K-FAC and EK-FAC
    represent exactly, so EK-FAC equals the exact solver."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(25, 4))
    Y = X @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(25, 2))
    torch.manual_seed(0)
    model = TorchModel(torch.nn.Linear(4, 2), task="regression", dtype="float64")
    ek = InfluenceFunction(model, solver="ekfac", damping=1e-3).fit(X[:20], Y[:20])
    ex = InfluenceFunction(model, solver="exact", damping=1e-3).fit(X[:20], Y[:20])
    assert_rel_close(ek.attribute(X[20:], Y[20:]), ex.attribute(X[20:], Y[20:]), rtol=1e-9)
    assert_rel_close(ek.self_influence(), ex.self_influence(), rtol=1e-9)


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
def test_ekfac_equals_hand_built_factors(fisher):
    """Softmax regression (one Linear layer with bias): K-FAC factors, their eigenbases and the
    eigenvalue corrections built by hand in numpy; scores g_x^T (F_ekfac + lambda I)^-1 g_i."""
    rng = np.random.default_rng(3)
    n, d, C, lam = 24, 4, 3, 0.02
    X = rng.normal(size=(n + 3, d))
    y = rng.integers(0, C, size=n + 3)
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, C).double()
    inf = InfluenceFunction(TorchModel(lin, dtype="float64"), solver="ekfac", damping=lam,
                            fisher=fisher).fit(X[:n], y[:n])
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()

    def parts(Xs, ys):
        a = np.hstack([Xs, np.ones((len(Xs), 1))])  # (n, d+1): bias as a last input column
        z = Xs @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = p - np.eye(C)[ys]  # d loss / d z
        return a, p, delta

    a, p, delta = parts(X[:n], y[:n])
    if fisher == "ggn":  # output-side pseudo-gradients: rows of (diag p - p p^T)^{1/2}
        ds = []
        for pi in p:
            w, V = np.linalg.eigh(np.diag(pi) - np.outer(pi, pi))
            ds.append((V * np.sqrt(np.clip(w, 0, None))) @ V.T)
        ds = np.stack(ds)  # (n, C pseudo-outputs, C)
    else:
        ds = delta[:, None, :]
    A = a.T @ a / n
    S = np.einsum("nco,ncp->op", ds, ds) / n
    QA, QS = np.linalg.eigh(A)[1], np.linalg.eigh(S)[1]
    lam_corr = np.einsum("nco,ni->oi", (ds @ QS) ** 2, (a @ QA) ** 2) / n  # (C, d+1)
    Q = np.kron(QS, QA)  # acts on vec of (C, d+1) matrices, row-major
    Finv = Q @ np.diag(1.0 / (lam_corr.ravel() + lam)) @ Q.T

    def grads(Xs, ys):  # per-example gradient of [W | b] as (C, d+1) row-major
        a_, _, dl = parts(Xs, ys)
        return np.einsum("no,ni->noi", dl, a_).reshape(len(Xs), -1)

    g_tr, g_te = grads(X[:n], y[:n]), grads(X[n:], y[n:])
    assert_rel_close(inf.attribute(X[n:], y[n:]), g_te @ Finv @ g_tr.T, rtol=1e-9)
    assert_rel_close(inf.self_influence(), np.einsum("ip,pq,iq->i", g_tr, Finv, g_tr), rtol=1e-9)


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
def test_ekfac_correlates_with_exact_on_an_mlp(fisher, trained, data):
    """A Gauss-Newton / Fisher approximation of an MLP's Hessian: measured Pearson 0.92 (ggn)
    and 0.95 (empirical) at damping 0.2 on this 30-example fit (it falls with the damping:
    0.57 / 0.90 at 0.05, where the Hessian's non-Gauss-Newton part weighs more)."""
    Xtr, ytr, Xte, yte = data
    ex = InfluenceFunction(trained, solver="exact", damping=0.2).fit(Xtr, ytr)
    ek = InfluenceFunction(trained, solver="ekfac", damping=0.2, fisher=fisher).fit(Xtr, ytr)
    S, E = ex.attribute(Xte, yte).ravel(), ek.attribute(Xte, yte).ravel()
    assert np.corrcoef(S, E)[0, 1] > 0.85


# ----------------------------------------------------------------------------- kernel, sklearn
@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_kernel_training_block_is_a_gram_matrix(solver, trained, data, exact_fit):
    Xtr, ytr, _, _ = data
    damping = 0.05
    if solver == "exact":  # large enough: H + damping I positive definite
        damping = max(0.0, -exact_fit.hessian_eigenvalues_.min()) + 0.05
    inf = InfluenceFunction(trained, solver=solver, damping=damping).fit(Xtr, ytr)
    K = inf.kernel(Xtr)
    np.testing.assert_array_equal(K, K.T)
    w = np.linalg.eigvalsh(K)
    assert w.min() >= -1e-10 * w.max()


@pytest.mark.parametrize("solver", ["exact", "cg", "ekfac"])
def test_clone_and_pickle_round_trips(solver, trained, data):
    Xtr, ytr, Xte, yte = data
    inf = InfluenceFunction(trained, solver=solver, damping=0.3).fit(Xtr, ytr)
    S = inf.attribute(Xte, yte)
    np.testing.assert_array_equal(clone(inf).fit(Xtr, ytr).attribute(Xte, yte), S)
    back = pickle.loads(pickle.dumps(inf))
    np.testing.assert_array_equal(back.attribute(Xte, yte), S)
    np.testing.assert_array_equal(back.self_influence(), inf.self_influence())


def test_top_k(exact_fit, data):
    _, _, Xte, yte = data
    S = exact_fit.attribute(Xte, yte)
    tk = exact_fit.top_k(Xte, yte, k=4)
    np.testing.assert_array_equal(tk.proponents, np.argsort(-S, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(tk.opponents, np.argsort(S, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(tk.proponent_scores, np.sort(S, axis=1)[:, ::-1][:, :4])
    assert (tk.proponent_scores[:, 0] >= tk.opponent_scores[:, 0]).all()


# ----------------------------------------------------------------------------- bad input
def _dead_input_model(data):
    Xtr, ytr, _, _ = data
    X = Xtr.copy()
    X[:, 0] = 0.0  # the first input column is always zero: its weights have zero curvature
    torch.manual_seed(0)
    return TorchModel(torch.nn.Linear(5, 3), dtype="float64"), X, ytr


@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_zero_damping_with_singular_hessian_raises(solver, data):
    model, X, y = _dead_input_model(data)
    with pytest.raises(ValueError, match="singular.*damping"):
        InfluenceFunction(model, solver=solver, damping=0.0).fit(X, y)
    InfluenceFunction(model, solver=solver, damping=1e-3).fit(X, y)  # damped: fine


def test_exact_hessian_too_large_raises(trained, data, monkeypatch):
    import skattr._validation as v

    D = InfluenceFunction(trained).fit(*data[:2]).n_params_
    monkeypatch.setattr(v, "available_memory", lambda: 2 * (2 * D * D * 8))  # features fit
    with pytest.raises(MemoryError, match="exact Hessian.*solver='cg', 'lissa' or 'ekfac'"):
        InfluenceFunction(trained, solver="exact").fit(*data[:2])


def test_non_convergence_warns(trained, data):
    Xtr, ytr, Xte, yte = data
    with pytest.warns(ConvergenceWarning, match="CG did not converge.*n_iter=2.*damping=0.05"):
        InfluenceFunction(trained, solver="cg", damping=0.05, n_iter=2).fit(Xtr, ytr).attribute(Xte, yte)
    with pytest.warns(ConvergenceWarning, match="LiSSA did not converge.*n_iter=3.*damping=0.5"):
        InfluenceFunction(trained, solver="lissa", damping=0.5, n_iter=3).fit(Xtr, ytr).attribute(Xte, yte)
    with pytest.raises(ValueError, match="LiSSA diverged.*lissa_scale"):
        InfluenceFunction(trained, solver="lissa", damping=0.5, lissa_scale=1e-3).fit(
            Xtr, ytr).attribute(Xte, yte)


def test_indefinite_system_warns_for_cg(data):
    Xtr, ytr, Xte, yte = data
    model = TorchModel(make_mlp(), dtype="float64")  # untrained: indefinite Hessian
    ev = InfluenceFunction(model, damping=1e-3).fit(Xtr, ytr).hessian_eigenvalues_
    assert ev.min() < 0
    cg = InfluenceFunction(model, solver="cg", damping=1e-3, n_iter=30).fit(Xtr, ytr)
    with pytest.warns(UserWarning, match="negative curvature"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                cg.attribute(Xte, yte)
            except ValueError as exc:  # ends no better than x = 0: an error, not scores
                assert "negative curvature" in str(exc) and cg.curvature_.history_[-1] >= 1.0


def test_nan_parameters_and_bad_params_raise(data):
    Xtr, ytr, _, _ = data
    net = make_mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    for solver in ("exact", "ekfac", "cg"):
        with pytest.raises(ValueError, match="NaN"):
            InfluenceFunction(TorchModel(net, dtype="float64"), solver=solver).fit(Xtr, ytr)
    model = TorchModel(make_mlp(), dtype="float64")
    with pytest.raises(InvalidParameterError, match="damping"):
        InfluenceFunction(model, damping=-1.0).fit(Xtr, ytr)
    with pytest.raises(InvalidParameterError, match="solver"):
        InfluenceFunction(model, solver="newton").fit(Xtr, ytr)


# ----------------------------------------------------------------------------- docs
def test_docs_page_examples(tmp_path, monkeypatch):
    from pathlib import Path

    from test_docs import python_blocks

    page = Path(__file__).resolve().parent.parent / "docs" / "influence.md"
    blocks = python_blocks(page.read_text())
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns = {}
    for code in blocks:
        exec(compile(code, str(page), "exec"), ns)


def test_featurizer_records_match_reference(trained, data):
    """The loss-gradient rows InfluenceFunction stores are the reference gradients."""
    Xtr, ytr, _, _ = data
    fz = Featurizer(trained, LossOutput(), projection_dim=None, projection="kronecker", seed=0)
    fz.output.check(trained)
    F_rows, _ = fz.rows(Xtr, torch.as_tensor(ytr), 0, len(Xtr))
    assert_rel_close(F_rows, ref_grads(trained.network(), Xtr, ytr), rtol=1e-12)


def test_cg_no_better_than_zero_is_an_error(data):
    """A CG solve that ends with relative residual >= 1 returns nothing (a new user got scores
    of inverted sign from one, with only warnings); the residual is checked independently."""
    from skattr.hessian import ConjugateGradient

    Xtr, ytr, Xte, yte = data
    model = TorchModel(make_mlp(), dtype="float64")  # untrained: indefinite Hessian
    inf = InfluenceFunction(model, solver="exact", damping=1e-3).fit(Xtr, ytr)
    lam_min = inf.hessian_eigenvalues_.min()
    assert lam_min < -1e-3
    # the shift that makes H + damping I have an eigenvalue of -|lam_min|: CG's iterates blow up
    # along it, and the residual ends far above 1 (checked from the history, not the message)
    cg = InfluenceFunction(model, solver="cg", damping=1e-3, n_iter=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cg.fit(Xtr, ytr).attribute(Xte, yte)
        except ValueError as exc:
            assert "CG failed: relative residual" in str(exc) and "damping=0.001" in str(exc)
            assert isinstance(cg.curvature_, ConjugateGradient)
            assert cg.curvature_.history_[-1] >= 1.0
        else:
            assert cg.curvature_.history_[-1] < 1.0


# ----------------------------------------------------------------------------- n_jobs
def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    # torch's own DeprecationWarnings at a fresh worker's first use are not the solver's
    return out, [(w.category, str(w.message)) for w in caught
                 if w.category is not DeprecationWarning]


@pytest.mark.parametrize("solver, kw, backend", [
    ("exact", dict(projection_dim=8), "threading"),
    ("cg", dict(n_iter=2), "loky"),  # stops short: a ConvergenceWarning per batch
    ("lissa", dict(n_iter=10, lissa_batch_size=5), "loky"),  # stochastic: seeded minibatches
    ("ekfac", dict(), "threading"),
])
def test_n_jobs_equals_one_process(solver, kw, backend, trained, data, monkeypatch):
    """Solves spread over 2 workers (one job per gradient batch of 4 rows; loky processes for
    CG, whose state and warnings come back from another process) equal those of one process
    exactly: scores, self-influence, kernel, the solver's last history
    and the warnings (re-emitted in batch order)."""
    import joblib

    Xtr, ytr, Xte, yte = data
    Xtr, ytr = Xtr[:12], ytr[:12]  # 3 batches of HVPs per iteration
    est = InfluenceFunction(trained, solver=solver, damping=0.5, batch_size=4, **kw)
    runs = []
    for n_jobs in (1, 2):
        with joblib.parallel_config(backend=backend):
            inf = clone(est).set_params(n_jobs=n_jobs).fit(Xtr, ytr)
            S, wS = _record(lambda: inf.attribute(Xte, yte))
            si, wsi = _record(inf.self_influence)
            K, wK = _record(lambda: inf.kernel(Xte))
        runs.append((S, si, K, wS + wsi + wK, getattr(inf.curvature_, "history_", None)))
    (S1, si1, K1, w1, h1), (S2, si2, K2, w2, h2) = runs
    if backend == "threading":  # the batches ran as jobs in worker threads: counted
        import threading

        import skattr.estimators.influence as inf_mod

        ran, f = [], inf_mod._solve_block
        monkeypatch.setattr(inf_mod, "_solve_block",
                            lambda *a: ran.append(threading.get_ident()) or f(*a))
        with joblib.parallel_config(backend=backend):
            np.testing.assert_array_equal(inf.attribute(Xte, yte), S1)
        assert len(ran) == 2 and threading.get_ident() not in ran
    np.testing.assert_array_equal(S2, S1)
    np.testing.assert_array_equal(si2, si1)
    np.testing.assert_array_equal(K2, K1)
    assert h2 == h1 and w2 == w1
    if solver == "cg":  # 6 target rows, 12 training rows: 2 + 3 + 2 batches, none converged
        assert [c for c, _ in w1] == [ConvergenceWarning] * 7


def test_n_jobs_names_the_failing_block(exact_fit, data, monkeypatch):
    """A solve that fails in a worker is reported with its rows and the worker."""
    import joblib

    from skattr.hessian import ExactInverse
    from skattr.parallel import BlockError

    _, _, Xte, yte = data
    inf = clone(exact_fit).set_params(batch_size=4, n_jobs=2)
    orig = ExactInverse.solve

    def solve(self, G, loss=None):
        if G.shape[0] == 2:  # the last batch of the 6 targets
            raise FloatingPointError("simulated failure")
        return orig(self, G, loss)

    with joblib.parallel_config(backend="threading"):
        inf.fit(*data[:2])
        monkeypatch.setattr(ExactInverse, "solve", solve)
        with pytest.raises(BlockError, match=r"exact solve of rows 4:6 failed on worker \S+:\d+: "
                                             r"FloatingPointError: simulated failure"):
            inf.attribute(Xte, yte)


def test_iterative_solves_refuse_threads(trained, data):
    """Concurrent forward-mode HVPs in threads are not reliable in torch: under the threading
    backend CG runs its blocks in this process, says so, and equals the one-process result."""
    import joblib

    Xtr, ytr, Xte, yte = data
    inf = InfluenceFunction(trained, solver="cg", damping=0.5, batch_size=4, n_iter=2)
    inf.fit(Xtr[:12], ytr[:12])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        S1 = inf.attribute(Xte, yte)
        with joblib.parallel_config(backend="threading"):
            with pytest.warns(UserWarning,
                              match="one after another in this process.*not thread-safe"):
                S2 = inf.set_params(n_jobs=2).attribute(Xte, yte)
    np.testing.assert_array_equal(S2, S1)
