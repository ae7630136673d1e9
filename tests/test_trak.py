"""TRAK: exactness against a direct numpy implementation, convergence, ensembles, store, bad input."""

import copy
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch.func import functional_call, jacrev

from skattr import TorchModel
from skattr.estimators.trak import TRAK
from skattr.featurize import Featurizer
from skattr.outputs import LogitOutput, MarginOutput, output_values
from skattr.preconditioners import RidgeGaussNewton
from skattr.store import FeatureStore

N, D, C = 36, 5, 3


def _data(n=N, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, D), rng.randint(0, C, n)


def _net(hidden, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, C)
    )


@pytest.fixture(scope="module")
def data():
    X, y = _data()
    Xt, yt = _data(7, seed=1)
    return X, y, Xt, yt


def _fit_model(hidden, X, y, seed=0, dtype="float64"):
    return TorchModel(_net(hidden, seed), dtype=dtype, epochs=3, lr=0.1, random_state=seed).fit(X, y)


@pytest.fixture(scope="module")
def models(data):
    X, y, _, _ = data
    return {h: _fit_model(h, X, y) for h in (3, 16)}


def _margin_grads(model, X, y):
    """Per-example gradients of the multiclass margin by torch.func.jacrev, one example at a time."""
    mod = model.module_
    params = {k: v.detach() for k, v in mod.named_parameters()}

    def margin(p, x, c):
        z = functional_call(mod, (p,), (x[None],))[0]
        others = z.clone()
        others[c] = -float("inf")
        return z[c] - torch.logsumexp(others, 0)

    rows = []
    for x, c in zip(torch.as_tensor(X), y):
        J = jacrev(margin)(params, x, int(c))
        rows.append(torch.cat([J[k].reshape(-1) for k in params]))
    return torch.stack(rows).numpy()


def _numpy_trak(model, X, y, Xt, yt, ridge):
    """The TRAK formula written out: g(x)^T (Phi^T Phi + lambda I)^-1 phi_i (1 - p_i)."""
    Phi, g = _margin_grads(model, X, y), _margin_grads(model, Xt, yt)
    lam = ridge * (Phi**2).sum(1).mean()
    A = np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1]))
    p = model.predict_proba(X)[np.arange(len(y)), y]
    return g @ A @ Phi.T * (1 - p), np.einsum("ij,jk,ik->i", Phi, A, Phi) * (1 - p)


# ------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("hidden,solver", [(3, "primal"), (16, "dual")])
def test_exact_trak_equals_numpy_formula(data, models, hidden, solver):
    X, y, Xt, yt = data
    model = models[hidden]
    trak = TRAK(model, projection_dim=None, ridge=1e-2).fit(X, y)
    assert trak.solver_ == solver  # p = 27 < n (k x k system) and p = 115 > n (n x n system)
    ref, ref_self = _numpy_trak(model, X, y, Xt, yt, 1e-2)
    S = trak.attribute(Xt, yt)
    assert S.shape == (len(Xt), len(X))
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(trak.self_influence(), ref_self, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("hidden, solver", [(3, "primal"), (16, "dual")])
def test_float32_features_match_float64_formula(data, models, hidden, solver):
    """float32 features take the float32 path (products, factorisation, solves): the scores
    stay within float32 accuracy of the float64 formula on the same weights."""
    X, y, Xt, yt = data
    m64 = models[hidden]
    m32 = TorchModel(copy.deepcopy(m64.module_).float(), dtype="float32")  # wrapped, used as is
    trak = TRAK(m32, projection_dim=None, ridge=1e-2).fit(X, y)
    assert trak.solver_ == solver and trak.cholesky_[0].dtype == np.float32
    ref, ref_self = _numpy_trak(m64, X, y, Xt, yt, 1e-2)
    S = trak.attribute(Xt, yt)
    assert S.dtype == np.float64
    # measured: 2.5e-6 (primal) and 1.0e-5 (dual) of the largest score
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(trak.self_influence(), ref_self, rtol=1e-4, atol=1e-6)


def test_float32_factorisation_only_when_well_conditioned(data, models):
    """float32 features are factorised in float32 only while 1 + n / ridge (a bound on the
    system's condition number) is at most 1e5; beyond, the factor is float64."""
    X, y, _, _ = data
    m32 = TorchModel(copy.deepcopy(models[16].module_).float(), dtype="float32")
    for ridge, dtype in ((1e-2, np.float32), (1e-5, np.float64)):
        trak = TRAK(m32, projection_dim=24, ridge=ridge).fit(X, y)
        assert trak.cholesky_[0].dtype == dtype, ridge
        assert np.isfinite(trak.attribute(X[:3], y[:3])).all()


def test_float32_factorisation_falls_back_to_float64(models):
    """A system that is positive definite in float64 but singular once rounded to float32 is
    factorised in float64 instead of failing or returning garbage."""
    pre = RidgeGaussNewton(1e-12)
    pre.solver_ = "primal"
    A = torch.tensor([[1.0, 1.0 - 1e-9], [1.0 - 1e-9, 1.0]], dtype=torch.float64)
    assert torch.linalg.cholesky_ex(A.float())[1] != 0  # breaks down in float32
    L = pre._cholesky(A, 0, 1e-12, torch.float32)
    assert L.dtype == torch.float64
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1e-15)


@pytest.mark.parametrize("projection", ["kronecker", "factored", "gaussian"])
def test_projected_scores_converge_to_exact(data, models, projection):
    X, y, Xt, yt = data
    model = models[16]
    exact = TRAK(model, projection_dim=None, ridge=1e-2).fit(X, y).attribute(Xt, yt)
    errs = []
    for k in (32, 256, 2048):
        S = TRAK(model, projection_dim=k, projection=projection, ridge=1e-2).fit(X, y).attribute(Xt, yt)
        errs.append(np.linalg.norm(S - exact) / np.linalg.norm(exact))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.15, errs


def test_cnn_exact_and_projected(data):
    """A CNN with strided/padded convolutions, BatchNorm and LayerNorm: exact TRAK equals the
    formula on jacrev gradients; projected TRAK (dense rows for small conv layers, factored for
    the rest) converges to it and does not depend on the batch size."""
    from conftest import input_for, make_cnn, ref_jacobian

    X, Xt = input_for("cnn", 30), input_for("cnn", 5, seed=3)
    rng = np.random.RandomState(0)
    y, yt = rng.randint(0, 3, 30), rng.randint(0, 3, 5)
    model = TorchModel(make_cnn(), dtype="float64")  # a wrapped network, used as is

    def margin(z, c):
        others = z.clone()
        others[0, c[0]] = -float("inf")
        return (z[0, c[0]] - torch.logsumexp(others[0], 0)).reshape(1, 1)

    Phi = ref_jacobian(model.module, X, fn=margin, y=torch.as_tensor(y))[:, 0].numpy()
    g = ref_jacobian(model.module, Xt, fn=margin, y=torch.as_tensor(yt))[:, 0].numpy()
    lam = 0.1 * (Phi**2).sum(1).mean()
    p = model.predict_proba(X)[np.arange(30), y]
    ref = g @ np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1])) @ Phi.T * (1 - p)
    S = TRAK(model, projection_dim=None, ridge=0.1).fit(X, y).attribute(Xt, yt)
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    errs = []
    for k in (64, 4096):
        Sk = TRAK(model, projection_dim=k, ridge=0.1, batch_size=7).fit(X, y).attribute(Xt, yt)
        errs.append(np.linalg.norm(Sk - ref) / np.linalg.norm(ref))
    assert errs[1] < errs[0] and errs[1] < 0.15, errs
    S2 = TRAK(model, projection_dim=4096, ridge=0.1, batch_size=30).fit(X, y).attribute(Xt, yt)
    np.testing.assert_allclose(S2, Sk, rtol=1e-8, atol=1e-12)


def test_nested_projection_consistent(data, models):
    # the same seed gives the same scores for any batch size (seeded, batch-independent projection)
    X, y, Xt, yt = data
    a = TRAK(models[16], projection_dim=64, batch_size=5).fit(X, y).attribute(Xt, yt)
    b = TRAK(models[16], projection_dim=64, batch_size=50).fit(X, y).attribute(Xt, yt)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_ensemble_is_average_times_mean_q(data):
    X, y, Xt, yt = data
    m1, m2 = _fit_model(8, X, y, seed=1), _fit_model(8, X, y, seed=2)
    t1 = TRAK(m1, projection_dim=None).fit(X, y)
    t2 = TRAK(m2, projection_dim=None).fit(X, y)
    both = TRAK(m1, models=[m1, m2], projection_dim=None).fit(X, y)
    s1, s2 = t1.attribute(Xt, yt) / t1.q_, t2.attribute(Xt, yt) / t2.q_
    expected = (s1 + s2) / 2 * (t1.q_ + t2.q_) / 2
    np.testing.assert_allclose(both.attribute(Xt, yt), expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(both.q_, (t1.q_ + t2.q_) / 2)
    # n_models picks the first members of a given list
    one = TRAK(m1, models=[m1, m2], n_models=1, projection_dim=None).fit(X, y)
    np.testing.assert_allclose(one.attribute(Xt, yt), t1.attribute(Xt, yt), rtol=1e-10)


def test_trained_ensemble_is_seeded_and_nested(data):
    X, y, Xt, yt = data
    template = TorchModel(_net(4), dtype="float64", epochs=2, lr=0.1, random_state=0)
    t3 = TRAK(template, n_models=3, projection_dim=32, random_state=5).fit(X, y)
    t2 = TRAK(template, n_models=2, projection_dim=32, random_state=5).fit(X, y)
    assert t3.subsets_.shape == (3, N) and np.all(t3.subsets_.sum(1) == N // 2)
    np.testing.assert_array_equal(t3.subsets_[:2], t2.subsets_)
    assert [m.fingerprint() for m in t3.models_[:2]] == [m.fingerprint() for m in t2.models_]
    again = TRAK(template, n_models=2, projection_dim=32, random_state=5).fit(X, y)
    np.testing.assert_array_equal(again.attribute(Xt, yt), t2.attribute(Xt, yt))
    # each member was trained on its subset only
    assert all(not np.array_equal(a, b) for a, b in zip(t3.subsets_[0:1], t3.subsets_[1:2]))


def test_transform_attributes_own_predictions(data, models):
    X, y, Xt, _ = data
    trak = TRAK(models[16], projection_dim=64).fit(X, y)
    pred = models[16].predict(Xt)
    np.testing.assert_allclose(trak.transform(Xt), trak.attribute(Xt, pred))
    # fit without labels uses the model's predictions on the training set
    t0 = TRAK(models[16], projection_dim=64).fit(X)
    np.testing.assert_allclose(t0.q_, 1 - models[16].predict_proba(X).max(1), rtol=1e-6)


def test_output_functions_and_q(data, models):
    X, y, Xt, yt = data
    model = models[16]
    P = model.predict_proba(X)
    t = TRAK(model, projection_dim=64, output="logit").fit(X, y)
    np.testing.assert_allclose(t.q_, 1 - P[np.arange(N), y], rtol=1e-6)
    t = TRAK(model, projection_dim=64, output=2).fit(X, y)
    np.testing.assert_allclose(t.q_, (y == 2) - P[:, 2], rtol=1e-6, atol=1e-12)
    fn = lambda z, yy: z[:, 0] - z[:, 1]  # noqa: E731
    t = TRAK(model, projection_dim=64, output=fn).fit(X, y)
    np.testing.assert_allclose(t.q_, 1.0)
    assert t.attribute(Xt, yt).shape == (7, N)
    # the LDS harness measures the same output
    z = model.decision_function(Xt)
    np.testing.assert_allclose(output_values(model, Xt, yt, 1), z[:, 1], rtol=1e-6)
    m = MarginOutput()(torch.as_tensor(z), torch.as_tensor(yt)).numpy()
    np.testing.assert_allclose(output_values(model, Xt, yt, "margin"), m, rtol=1e-6)
    assert isinstance(LogitOutput(1), LogitOutput)


# ------------------------------------------------------------------------------- sklearn
def test_clone_pickle_joblib_roundtrips(data, models, tmp_path):
    X, y, Xt, yt = data
    trak = TRAK(models[16], projection_dim=64, ridge=0.1)
    c = clone(trak)
    assert c.model is not trak.model and c.get_params()["ridge"] == 0.1
    a = trak.fit(X, y).attribute(Xt, yt)
    np.testing.assert_array_equal(c.fit(X, y).attribute(Xt, yt), a)  # clone keeps the weights
    b = pickle.loads(pickle.dumps(trak)).attribute(Xt, yt)
    np.testing.assert_array_equal(a, b)
    joblib.dump(trak, tmp_path / "t.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "t.joblib").attribute(Xt, yt), a)
    # a store-backed estimator pickles its store's path, not its features
    st = TRAK(models[16], projection_dim=64, ridge=0.1, store=tmp_path / "s", block_size=10).fit(X, y)
    s2 = pickle.loads(pickle.dumps(st))
    np.testing.assert_allclose(s2.attribute(Xt, yt), a, rtol=1e-9, atol=1e-12)


class _AnyWidth(torch.nn.Module):
    """Accepts any number of input features (sklearn's checks vary it): pools them to two."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10))

    def forward(self, x):
        x = x.flatten(1)
        return self.body(torch.stack([x.mean(1), (x**2).mean(1)], 1))


def _any_width_trak():
    torch.manual_seed(0)
    return TRAK(TorchModel(_AnyWidth(), dtype="float64"), projection_dim=16)


@parametrize_with_checks(
    [_any_width_trak()],
    expected_failed_checks=lambda est: {
        # joblib.hash of a torch tensor differs between deep copies of it, so this check sees
        # a change of `model` where there is none; test_fit_does_not_mutate_model checks the
        # weights directly.
        "check_estimators_overwrite_params": "joblib.hash of torch tensors is not copy-stable",
    },
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


def test_fit_does_not_mutate_model(data, models):
    X, y, _, _ = data
    before = {k: v.clone() for k, v in models[16].module_.state_dict().items()}
    TRAK(models[16], projection_dim=16).fit(X, y).attribute(X[:3], y[:3])
    after = models[16].module_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------- store
def test_store_blockwise_equals_in_memory(data, models, tmp_path):
    X, y, Xt, yt = data
    mem = TRAK(models[16], projection_dim=48, ridge=0.1).fit(X, y)
    for k in (48, 20):  # dual (k > n) and primal (k <= n) systems, block by block
        mem = TRAK(models[16], projection_dim=k, ridge=0.1).fit(X, y)
        st = TRAK(models[16], projection_dim=k, ridge=0.1, store=tmp_path, block_size=7).fit(X, y)
        assert st.store_.n_blocks == 6 and st.store_.complete()
        np.testing.assert_allclose(st.attribute(Xt, yt), mem.attribute(Xt, yt), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(st.self_influence(), mem.self_influence(), rtol=1e-8, atol=1e-12)
    # different settings never share a store directory
    assert len(list(tmp_path.glob("store-*"))) == 2
    # the saved system is its upper triangle only (no uninitialised half), and a refit on the
    # same store loads it and gives the same scores
    for sub in tmp_path.glob("store-*"):
        for f in sub.rglob("m000_gram_*.npy"):
            U = np.load(f)
            assert np.array_equal(U, np.triu(U)) and np.all(np.diag(U) > 0)
    again = TRAK(models[16], projection_dim=20, ridge=0.1, store=tmp_path, block_size=7).fit(X, y)
    np.testing.assert_allclose(again.attribute(Xt, yt), st.attribute(Xt, yt), rtol=1e-12, atol=0)


def test_interrupted_store_resumes(data, models, tmp_path, monkeypatch):
    X, y, Xt, yt = data
    calls = {"write": 0, "featurize": 0}
    orig_write = FeatureStore.write

    def failing_write(self, m, b, F, q):
        if calls["write"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        calls["write"] += 1
        return orig_write(self, m, b, F, q)

    monkeypatch.setattr(FeatureStore, "write", failing_write)
    trak = TRAK(models[16], projection_dim=32, store=tmp_path, block_size=5)
    with pytest.raises(KeyboardInterrupt):
        trak.fit(X, y)
    monkeypatch.setattr(FeatureStore, "write", orig_write)
    orig_feat = Featurizer.rows

    def counting(self, *a, **k):
        calls["featurize"] += 1
        return orig_feat(self, *a, **k)

    monkeypatch.setattr(Featurizer, "rows", counting)
    trak.fit(X, y)
    # 8 blocks of 5 rows: 3 were finished before the interruption, 5 remain (+ nothing else)
    assert calls["featurize"] == 5
    ref = TRAK(models[16], projection_dim=32).fit(X, y).attribute(Xt, yt)
    np.testing.assert_allclose(trak.attribute(Xt, yt), ref, rtol=1e-8, atol=1e-12)


def test_damaged_store_block_is_recomputed(data, models, tmp_path):
    X, y, Xt, yt = data
    trak = TRAK(models[16], projection_dim=32, store=tmp_path, block_size=10).fit(X, y)
    ref = trak.attribute(Xt, yt)
    block = sorted(trak.store_.path.glob("m000_b000001.f.npy"))[0]
    block.write_bytes(block.read_bytes()[:50])  # truncated file
    for g in trak.store_.path.glob("*gram*"):
        g.unlink()
    with pytest.warns(UserWarning, match="missing or damaged"):
        again = TRAK(models[16], projection_dim=32, store=tmp_path, block_size=10).fit(X, y)
    np.testing.assert_allclose(again.attribute(Xt, yt), ref, rtol=1e-8, atol=1e-12)


def test_store_shape_mismatch_is_clear(tmp_path):
    FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2)
    with pytest.raises(ValueError, match="created with dim=3"):
        FeatureStore(tmp_path, n_rows=5, dim=4, n_models=1, block_size=2)


# ------------------------------------------------------------------------------- bad input
def test_mismatched_ensemble_members(data, models):
    X, y, _, _ = data
    with pytest.raises(ValueError, match="does not match models\\[0\\].*shape"):
        TRAK(models[3], models=[models[3], models[16]]).fit(X, y)
    with pytest.raises(ValueError, match="state dict that does not match"):
        TRAK(models[3], models=[models[16].module_.state_dict()]).fit(X, y)
    with pytest.raises(ValueError, match="n_models=3 but only 2"):
        TRAK(models[3], models=[models[3], models[3]], n_models=3).fit(X, y)
    with pytest.raises(TypeError, match="models\\[0\\] must be"):
        TRAK(models[3], models=[42]).fit(X, y)
    # checkpoints (state dicts, (step, state_dict) pairs) of the same architecture are fine
    sd = copy.deepcopy(models[3].module_.state_dict())
    t = TRAK(models[3], models=[sd, (10, sd)], projection_dim=16).fit(X, y)
    assert len(t.models_) == 2


def test_wrong_test_shape_and_labels(data, models):
    X, y, Xt, yt = data
    trak = TRAK(models[3], projection_dim=16).fit(X, y)
    with pytest.raises(ValueError, match="X has 4 features, but TRAK is expecting 5"):
        trak.attribute(Xt[:, :4], yt)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        trak.attribute(Xt, yt[:3])
    with pytest.raises(ValueError, match="not among the model's classes"):
        trak.attribute(Xt, yt + 10)
    with pytest.raises(ValueError, match="NaN"):
        trak.attribute(np.full_like(Xt, np.nan), yt)
    with pytest.raises(ValueError, match="scalar output"):
        TRAK(models[3], projection_dim=16, output=lambda z, yy: z).fit(X, y)
    with pytest.raises(ValueError, match="y is required"):
        TRAK(TorchModel(_net(3)), n_models=2).fit(X)


def test_ridge_zero_singular_is_clear(models):
    X, y = _data(10)
    Xd, yd = np.repeat(X, 3, axis=0), np.repeat(y, 3)  # 30 rows, 10 distinct
    with pytest.raises(ValueError, match="ridge=0.*singular|singular.*ridge=0"):
        TRAK(models[16], projection_dim=20, ridge=0).fit(Xd, yd)  # k x k, rank <= 10
    with pytest.raises(ValueError, match="singular"):
        TRAK(models[16], projection_dim=64, ridge=0).fit(Xd, yd)  # n x n, duplicate rows
    # ridge > 0 on the same data is fine; ridge = 0 on distinct rows is the min-norm solution
    TRAK(models[16], projection_dim=20, ridge=1e-3).fit(Xd, yd)
    t = TRAK(models[16], projection_dim=None, ridge=0).fit(X, y)
    np.testing.assert_allclose(t.self_influence(), t.q_, rtol=1e-6)  # leverage 1 when p > n


def test_regression_margin_is_clear():
    X, _ = _data()
    model = TorchModel(_net(4), task="regression", dtype="float64", epochs=1).fit(X, X[:, :3])
    with pytest.raises(ValueError, match="classification model"):
        TRAK(model).fit(X, X[:, :3])
    t = TRAK(model, output="logit", projection_dim=16).fit(X, X[:, :3])
    resid = X[:, 0] - model.predict(X)[:, 0]
    np.testing.assert_allclose(t.q_, resid, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------- docs
def test_docs_page_examples(tmp_path, monkeypatch):
    """The ```python blocks of docs/trak.md run, in order, in one namespace."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "trak.md"
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", page.read_text(), re.S | re.M)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "docs_trak"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/trak.md[{i}]", "exec"), ns)


def test_ensemble_members_use_independent_projections(data, models):
    """Each member has its own projection seed (member 0: random_state), so projection noise
    averages over the ensemble; an ensemble of two copies of one model is therefore not the
    single model's TRAK, and it is closer to the exact scores."""
    X, y, Xt, yt = data
    m = models[16]
    exact = TRAK(m, projection_dim=None).fit(X, y).attribute(Xt, yt)
    one = TRAK(m, projection_dim=64, random_state=3).fit(X, y).attribute(Xt, yt)
    two = TRAK(m, models=[m, m], projection_dim=64, random_state=3).fit(X, y).attribute(Xt, yt)
    again = TRAK(m, models=[m, m], projection_dim=64, random_state=3).fit(X, y).attribute(Xt, yt)
    np.testing.assert_array_equal(two, again)
    assert np.abs(two - one).max() > 1e-3 * np.abs(one).max()
    err = [np.linalg.norm(S - exact) / np.linalg.norm(exact) for S in (one, two)]
    assert err[1] < err[0], err
