"""Seeded, nested random projections: convergence, unbiasedness, nesting, determinism."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import MAKERS, input_for, make_cnn, make_mlp

from skattr import TorchModel
from skattr.cache import FeatureCache
from skattr.estimators import EmpiricalNTK, GradCosKernel, PseudoNTK, TraceNTK
from skattr.projection import KINDS, ROW_BLOCK, STRUCTURED, Projector, scale_features

DENSE_KINDS = ("rademacher", "gaussian", "sparse")


def _dense_features(kind, k, g, *, seed=0, start=0, key="w"):
    """Unscaled features (n, m, k) of dense gradients g (n, m, p)."""
    out = torch.zeros(*g.shape[:-1], k, dtype=g.dtype)
    Projector(kind, k, seed, start=start, dtype=g.dtype).project_dense(key, g, out)
    return out


def _factored_features(k, a, d, *, seed=0, start=0, key="w", kind="factored"):
    out = torch.zeros(a.shape[0], d.shape[2], k, dtype=a.dtype)
    Projector(kind, k, seed, start=start, dtype=a.dtype).project_factored(key, a, d, out)
    return out


def _features(kind, k, *, seed=0, start=0):
    """Features of a fixed set of gradients, through the dense or the factored path."""
    g = torch.Generator().manual_seed(11)
    if kind in STRUCTURED:
        a = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)  # (n, L, d_in)
        d = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)  # (n, L, m, d_out)
        return _factored_features(k, a, d, seed=seed, start=start, kind=kind)
    G = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    return _dense_features(kind, k, G, seed=seed, start=start)


# ----------------------------------------------------------------------------- convergence
def _rel_err(K, E):
    return np.abs(K - E).mean() / np.abs(E).max()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("cls", [TraceNTK, PseudoNTK, GradCosKernel, EmpiricalNTK],
                         ids=lambda c: c.__name__)
def test_projected_kernels_converge_to_exact(arch, cls):
    """Exact vs projected: the error at k=4096 is small and well below the error at k=64."""
    net = MAKERS[arch]()
    X = input_for(arch, 10)
    model = TorchModel(net, dtype="float64")
    kw = {"output": "blocks", "normalize": True} if cls is EmpiricalNTK else {}
    E = cls(model, **kw).fit(X).transform(X)
    for kind in KINDS:
        cache = FeatureCache()  # nested rows: the k=64 kernel reuses the first 64 of 4096 rows
        errs = {}
        for k in (4096, 64):
            K = cls(model, projection_dim=k, projection=kind, memory=cache, **kw).fit(X).transform(X)
            errs[k] = _rel_err(K, E)
        # kronecker rows share vectors: ~2.5x the variance of factored rows, ~1.6x the error
        assert errs[4096] < (0.032 if kind == "kronecker" else 0.02), (kind, errs)
        assert errs[64] > 2 * errs[4096], (kind, errs)


def test_projection_error_decreases_with_k():
    """The whole curve: mean abs error of the normalised trNTK falls as k grows (averaged over
    seeds so that the trend, ~1/sqrt(k), is not hidden by one draw)."""
    net = make_mlp(hidden=16)
    X = input_for("mlp", 12)
    model = TorchModel(net, dtype="float64")
    E = TraceNTK(model).fit(X).transform(X)
    ks = (16, 64, 256, 1024, 4096)
    errs = np.zeros(len(ks))
    for seed in range(3):
        cache = FeatureCache()
        for i, k in enumerate(ks[::-1]):
            K = TraceNTK(model, projection_dim=k, projection="rademacher", random_state=seed,
                         memory=cache).fit(X).transform(X)
            errs[len(ks) - 1 - i] += np.abs(K - E).mean() / 3
    assert np.all(np.diff(errs) < 0), errs
    # ~ 1/sqrt(k): 256x more rows gives roughly 16x less error
    assert 4 < errs[0] / errs[-1] < 64, errs


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("kind", KINDS)
def test_rows_give_unbiased_inner_products(kind):
    """Each row r gives an unbiased estimate (r.g)(r.g') of <g, g'>: the mean over k rows is
    within a few standard errors of the exact inner product (a statistical sanity check)."""
    k = 4096
    g = torch.Generator().manual_seed(5)
    if kind in STRUCTURED:
        a = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
        d = torch.randn(2, 3, 1, 4, generator=g, dtype=torch.float64)
        Fe = _factored_features(k, a, d, seed=1, kind=kind)[:, 0]  # (2, k)
        grads = torch.einsum("nlmo,nli->nmoi", d, a).flatten(1)
    else:
        grads = torch.randn(2, 1, 30, generator=g, dtype=torch.float64)
        grads[1, 0] += 0.8 * grads[0, 0]  # correlated pair
        Fe = _dense_features(kind, k, grads, seed=1)[:, 0]
        grads = grads[:, 0]
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        est = Fe[i] * Fe[j]  # per-row estimates
        if kind == "kronecker":  # rows are correlated within a block; blocks are independent
            est = est.reshape(-1, 16, 16).mean(1).flatten()  # super-block rows: (i, j) x block
        truth = float(grads[i] @ grads[j])
        se = float(est.std()) / np.sqrt(est.numel())
        assert abs(float(est.mean()) - truth) < 5 * se, (kind, i, j, float(est.mean()), truth, se)


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_features_estimate_the_kernel_in_expectation(kind):
    """Averaged over seeds, the scaled projected Gram equals the exact unnormalised Gram."""
    net = make_mlp()
    X = input_for("mlp", 5)
    model = TorchModel(net, dtype="float64")
    E = TraceNTK(model, normalize=False).fit(X).transform(X)
    est = np.mean([
        TraceNTK(model, projection_dim=256, projection=kind, normalize=False,
                 random_state=s).fit(X).transform(X)
        for s in range(16)
    ], axis=0)
    # 16 seeds x 256 rows = 4096 rows in all: relative error ~ sqrt(2/4096) per entry
    assert np.abs(est - E).max() < 0.1 * np.abs(E).max()


# ----------------------------------------------------------------------------- nesting, offsets
@pytest.mark.parametrize("kind", KINDS)
def test_nested_rows(kind):
    """The first k rows of a k'-row projection are the k-row projection (across row blocks)."""
    small = _features(kind, 100)
    big = _features(kind, 300)
    assert ROW_BLOCK < 300
    np.testing.assert_allclose(big[..., :100].numpy(), small.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_start_offsets_equal_slices(kind):
    full = _features(kind, 330)
    for start, k in [(0, 5), (100, 70), (128, 128), (257, 73)]:
        part = _features(kind, k, start=start)
        np.testing.assert_allclose(part.numpy(), full[..., start:start + k].numpy(),
                                   rtol=1e-12, atol=1e-12)


def test_large_parameter_groups_are_projected_in_row_chunks():
    """For p x k too large to cache, rows are generated chunk by chunk: still nested, offsets
    still slices, and batch-invariant."""
    p = 70_000  # > 2**16: chunks of ROW_BLOCK rows
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 1, p, generator=g, dtype=torch.float64)
    full = _dense_features("rademacher", 300, G)
    assert 300 * p * 8 > 64 * 2**20  # beyond the projector's cache: the chunked path
    np.testing.assert_allclose(_dense_features("rademacher", 100, G).numpy(), full[..., :100].numpy(),
                               rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(_dense_features("rademacher", 150, G, start=150).numpy(),
                               full[..., 150:].numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(_dense_features("rademacher", 300, G[1:2]).numpy(),
                               full[1:2].numpy(), rtol=1e-12, atol=1e-9)


def test_per_example_gradients_nested_up_to_sqrt_scaling():
    net = make_cnn()
    X = input_for("cnn", 5)
    model = TorchModel(net, dtype="float64")
    for kind in KINDS:
        G1 = model.per_example_gradients(X, projection_dim=100, projection=kind)
        G2 = model.per_example_gradients(X, projection_dim=300, projection=kind)
        np.testing.assert_allclose(G1 * np.sqrt(100), G2[:, :100] * np.sqrt(300), rtol=1e-10,
                                   atol=1e-12)


def test_kernel_features_nested_up_to_sqrt_scaling():
    net = make_mlp()
    X = input_for("mlp", 6)
    model = TorchModel(net, dtype="float64")
    for kind in KINDS:
        F1 = TraceNTK(model, projection_dim=64, projection=kind).fit(X).features_.numpy()
        F2 = TraceNTK(model, projection_dim=200, projection=kind).fit(X).features_.numpy()
        assert F1.shape == (6, 3, 64)
        np.testing.assert_allclose(F1 * 8, F2[..., :64] * np.sqrt(200), rtol=1e-10, atol=1e-12)


def test_scale_features():
    F = torch.arange(12.0).reshape(1, 2, 6)
    np.testing.assert_allclose(scale_features(F, 4).numpy(), F[..., :4].numpy() / 2)
    with pytest.raises(ValueError, match="only 6 were computed"):
        scale_features(F, 7)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_rows_different_seed_different_rows(kind):
    np.testing.assert_array_equal(_features(kind, 50, seed=3).numpy(), _features(kind, 50, seed=3).numpy())
    assert not np.allclose(_features(kind, 50, seed=3).numpy(), _features(kind, 50, seed=4).numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_invariance(kind):
    net = make_cnn()
    X = input_for("cnn", 9)
    model = TorchModel(net, dtype="float64")
    G1 = model.per_example_gradients(X, projection_dim=200, projection=kind, batch_size=2)
    G2 = model.per_example_gradients(X, projection_dim=200, projection=kind, batch_size=9)
    np.testing.assert_allclose(G1, G2, rtol=1e-12, atol=1e-14)
    K1 = TraceNTK(model, projection_dim=200, projection=kind, batch_size=2).fit(X).transform(X[:4])
    K2 = TraceNTK(model, projection_dim=200, projection=kind, batch_size=64).fit(X).transform(X[:4])
    np.testing.assert_allclose(K1, K2, rtol=1e-12, atol=1e-14)


def test_rows_do_not_depend_on_the_global_torch_seed():
    a = _features("gaussian", 64)
    torch.manual_seed(1234)
    torch.rand(10)
    np.testing.assert_array_equal(_features("gaussian", 64).numpy(), a.numpy())


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import input_for, make_cnn
    from skattr import TorchModel
    from skattr.projection import Projector
    out = {{}}
    for kind in ("rademacher", "gaussian", "sparse"):
        o = torch.zeros(37, 1, 200, dtype=torch.float64)
        Projector(kind, 200, 9, dtype=torch.float64).project_dense(
            "k", torch.eye(37, dtype=torch.float64)[:, None], o)
        out["rows_" + kind] = o[:, 0].numpy()
    U, V = Projector("factored", 200, 9, dtype=torch.float64).factors("k", 5, 7)
    out["U"], out["V"] = U.numpy(), V.numpy()
    net = make_cnn()
    net.load_state_dict(torch.load({state!r}))
    model = TorchModel(net, dtype="float64")
    X = input_for("cnn", 6)
    for kind in ("rademacher", "gaussian", "sparse", "factored", "kronecker"):
        out["G_" + kind] = model.per_example_gradients(X, projection_dim=150, projection=kind,
                                                       random_state=9, batch_size=4)
    np.savez({path!r}, **out)
    """
)


def test_identical_across_processes(tmp_path):
    """A fresh interpreter draws the same rows and the same projected gradients."""
    net = make_cnn(seed=5)
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    path = tmp_path / "child.npz"
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    code = _CHILD.format(tests=tests_dir, state=str(state), path=str(path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    child = np.load(path)
    for kind in DENSE_KINDS:
        o = torch.zeros(37, 1, 200, dtype=torch.float64)
        Projector(kind, 200, 9, dtype=torch.float64).project_dense(
            "k", torch.eye(37, dtype=torch.float64)[:, None], o)
        np.testing.assert_array_equal(child["rows_" + kind], o[:, 0].numpy())
    U, V = Projector("factored", 200, 9, dtype=torch.float64).factors("k", 5, 7)
    np.testing.assert_array_equal(child["U"], U.numpy())
    np.testing.assert_array_equal(child["V"], V.numpy())
    model = TorchModel(net, dtype="float64")
    X = input_for("cnn", 6)
    for kind in KINDS:
        G = model.per_example_gradients(X, projection_dim=150, projection=kind, random_state=9,
                                        batch_size=6)
        np.testing.assert_allclose(child["G_" + kind], G, rtol=1e-12, atol=1e-14)


def test_kronecker_rows_are_block_kronecker_products():
    """Row (i * 4 + j) * 16 + b of a 256-row super-block of the "kronecker" projection is
    u_{b,i} (x) v_{b,j} (block b of the super-block), read off the factors; and the rows of any
    start/size are those of the full projection, across super-blocks."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 1, 6, generator=g, dtype=torch.float64)
    d = torch.randn(3, 1, 2, 5, generator=g, dtype=torch.float64)
    G = torch.einsum("nlmo,nli->nmoi", d, a).flatten(2)  # (n, m, 30)
    F = _factored_features(300, a, d, seed=4, kind="kronecker")
    U, V = Projector("kronecker", 300, 4, dtype=torch.float64).factors("w", 5, 6)
    assert U.shape == (128, 5) and V.shape == (128, 6)  # 2 super-blocks of 64 vectors
    for r in (0, 5, 17, 47, 69, 255, 256, 299):
        sb, t = divmod(r, 256)
        b, i, j = t % 16, t // 16 // 4, t // 16 % 4
        # vector (b, i) of super-block sb is stored at sb * 64 + i * 16 + b
        row = torch.outer(U[sb * 64 + i * 16 + b], V[sb * 64 + j * 16 + b]).flatten()
        torch.testing.assert_close(F[..., r], G @ row, rtol=1e-12, atol=1e-12)
    for start, k in ((21, 30), (200, 90), (256, 10)):
        part = _factored_features(k, a, d, seed=4, start=start, kind="kronecker")
        torch.testing.assert_close(part, F[..., start:start + k], rtol=1e-12, atol=1e-12)


def test_projector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="projection must be one of"):
        Projector("bogus", 4, 0)
    with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
        Projector("gaussian", 0, 0)


@pytest.mark.parametrize("L", [1, 5])
def test_kronecker_rows_on_formed_gradients_match_factored(L):
    """A Conv layer whose gradient is cheaper to form is projected with the same kronecker rows
    applied to the formed gradient: identical features for any start and size."""
    g = torch.Generator().manual_seed(8)
    a = torch.randn(3, L, 7, generator=g, dtype=torch.float64)
    d = torch.randn(3, L, 2, 5, generator=g, dtype=torch.float64)
    G = torch.einsum("nlmo,nli->nmoi", d, a)
    for k, start in ((300, 0), (70, 200), (16, 0)):
        o1 = torch.zeros(3, 2, k, dtype=torch.float64)
        o2 = torch.zeros(3, 2, k, dtype=torch.float64)
        Projector("kronecker", k, 3, start=start, dtype=torch.float64).project_factored("w", a, d, o1)
        Projector("kronecker", k, 3, start=start, dtype=torch.float64).project_kronecker_dense("w", G, o2)
        torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
