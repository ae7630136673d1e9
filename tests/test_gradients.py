"""Per-example gradients (TorchModel and skattr.gradients) against jacrev references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MAKERS, assert_rel_close, input_for, make_cnn, make_mlp, ref_jacobian

from skattr import TorchModel
from skattr import gradients as G
from skattr.projection import Projector, scale_features


def _ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def _bce(z, y):
    return F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="none")


def _margin(z, y):
    zc = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return zc - torch.logsumexp(others, dim=1)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("method", ["auto", "structured", "vmap"])
def test_per_example_loss_gradients_match_jacrev(arch, method):
    net = MAKERS[arch]()
    X = input_for(arch, 5)
    y = np.array([0, 2, 1, 1, 0])
    model = TorchModel(net, dtype="float64")
    Gm = model.per_example_gradients(X, y, method=method)
    R = ref_jacobian(net, X, fn=_ce, y=torch.as_tensor(y))[:, 0]
    n_params = sum(p.numel() for p in net.parameters())
    assert Gm.shape == (5, n_params)
    assert_rel_close(Gm, R, rtol=1e-10)
    # and they are the gradients of the per-example losses TorchModel reports
    with torch.no_grad():
        np.testing.assert_allclose(
            model.per_example_loss(X, y), _ce(net(torch.as_tensor(X)), torch.as_tensor(y)).numpy(),
            rtol=1e-12,
        )


def test_per_example_gradients_default_labels_are_predictions():
    net = make_mlp()
    X = input_for("mlp", 6)
    model = TorchModel(net, dtype="float64")
    with torch.no_grad():
        pred = net(torch.as_tensor(X)).argmax(1)
    np.testing.assert_allclose(
        model.per_example_gradients(X), ref_jacobian(net, X, fn=_ce, y=pred)[:, 0].numpy(),
        rtol=1e-10, atol=1e-14,
    )


@pytest.mark.parametrize("output", ["logits", "sum_logits", "margin", "callable"])
@pytest.mark.parametrize("method", ["structured", "vmap"])
def test_other_outputs_match_jacrev(output, method):
    net = make_cnn()
    X = input_for("cnn", 4)
    y = np.array([2, 0, 1, 2])
    yt = torch.as_tensor(y)
    model = TorchModel(net, dtype="float64")
    if output == "logits":
        fn, expect = None, (4, 3)
    elif output == "sum_logits":
        fn, expect = (lambda z, yi: z.sum(1) / np.sqrt(3)), (4,)
    elif output == "margin":
        fn, expect = _margin, (4,)
    else:
        def output(z, yy):  # a user callable, two outputs per example
            return torch.stack([z[:, 0] * z[:, 1], torch.tanh(z).sum(1)], 1)

        fn, expect = output, (4, 2)
    Gm = model.per_example_gradients(X, y, output=output, method=method)
    R = ref_jacobian(net, X, fn=fn, y=yt)
    assert Gm.shape[:-1] == expect
    assert_rel_close(Gm, R[:, 0] if len(expect) == 1 else R, rtol=1e-10)


def test_binary_single_logit_loss_and_margin():
    net = make_mlp(n_out=1)
    X = input_for("mlp", 6)
    y = np.array([0, 1, 1, 0, 1, 0])
    model = TorchModel(net, dtype="float64")
    yt = torch.as_tensor(y)
    assert_rel_close(model.per_example_gradients(X, y), ref_jacobian(net, X, fn=_bce, y=yt)[:, 0])

    def sign_margin(z, yi):  # log(p / (1 - p)) of the correct class for one logit
        return (2.0 * yi.to(z.dtype) - 1.0) * z[:, 0]

    assert_rel_close(model.per_example_gradients(X, y, output="margin"),
                     ref_jacobian(net, X, fn=sign_margin, y=yt)[:, 0])


def test_regression_loss_gradients():
    net = make_mlp(n_out=2)
    X = input_for("mlp", 5)
    Y = np.random.RandomState(0).randn(5, 2)
    model = TorchModel(net, task="regression", dtype="float64")

    def sq(z, yi):
        return 0.5 * ((z - yi) ** 2).sum(1)

    assert_rel_close(model.per_example_gradients(X, Y), ref_jacobian(net, X, fn=sq, y=torch.as_tensor(Y))[:, 0])


@pytest.mark.parametrize("prefixes", [["0."], ["2.bias", "4."]])
def test_gradients_with_params_prefixes(prefixes):
    net = make_mlp()
    X = input_for("mlp", 4)
    y = np.array([0, 1, 2, 0])
    model = TorchModel(net, dtype="float64", params=prefixes)
    R = ref_jacobian(net, X, fn=_ce, y=torch.as_tensor(y), prefixes=prefixes)[:, 0]
    Gm = model.per_example_gradients(X, y)
    assert Gm.shape == R.shape
    assert_rel_close(Gm, R)


def test_gradients_are_batch_size_invariant():
    net = make_cnn()
    X = input_for("cnn", 9)
    model = TorchModel(net, dtype="float64")
    G1 = model.per_example_gradients(X, batch_size=2)
    G2 = model.per_example_gradients(X, batch_size=9)
    np.testing.assert_allclose(G1, G2, rtol=1e-12, atol=1e-15)


def test_float32_gradients():
    net64 = make_cnn()
    net32 = make_cnn(dtype=torch.float32)
    X = input_for("cnn", 4)
    y = np.array([0, 1, 2, 1])
    G32 = TorchModel(net32).per_example_gradients(X.astype(np.float32), y)
    assert G32.dtype == np.float32
    assert_rel_close(G32, ref_jacobian(net64, X, fn=_ce, y=torch.as_tensor(y))[:, 0], rtol=1e-5)


# ----------------------------------------------------------------------------- record algebra
@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
def test_records_gram_self_gram_flatten_project(arch):
    """The structured records' contractions equal the same contractions of dense Jacobians."""
    net = MAKERS[arch]()
    XA, XB = input_for(arch, 3, seed=4), input_for(arch, 5, seed=5)
    JA, JB = ref_jacobian(net, XA), ref_jacobian(net, XB)
    tA, tB = torch.as_tensor(XA), torch.as_tensor(XB)
    for method in ("structured", "vmap"):
        rA = G.compute_records(net, tA, output="logits", method=method)
        rB = G.compute_records(net, tB, output="logits", method=method)
        if method == "structured":
            assert any(isinstance(r, G.KronRecord) for r in rA)
        assert_rel_close(G.flatten(rA), JA, rtol=1e-12)
        assert_rel_close(G.gram(rA, rB, "trace"), torch.einsum("icp,jcp->ij", JA, JB), rtol=1e-12)
        assert_rel_close(G.gram(rA, rB, "full"), torch.einsum("icp,jdp->ijcd", JA, JB), rtol=1e-12)
        assert_rel_close(G.self_gram(rA, "trace"), (JA**2).sum((1, 2)), rtol=1e-12)
        assert_rel_close(G.self_gram(rA, "full"), torch.einsum("icp,idp->icd", JA, JA), rtol=1e-12)
        # projecting the records = each parameter group's gradients times its own seeded rows
        P = Projector("gaussian", 16, seed=3, dtype=torch.float64)
        F_rec = G.project(rA, P)
        assert F_rec.shape == (3, 3, 16)
        out = torch.zeros(3, 3, 16, dtype=torch.float64)
        for r in rA:
            Projector("gaussian", 16, seed=3, dtype=torch.float64).project_dense(r.key, r.dense(), out)
        assert_rel_close(F_rec, out, rtol=1e-12)


def test_projected_gradients_are_scaled_projections():
    net = make_mlp()
    X = input_for("mlp", 4)
    y = np.array([0, 1, 2, 0])
    model = TorchModel(net, dtype="float64")
    Gfull = model.per_example_gradients(X, y)
    Gp = model.per_example_gradients(X, y, projection_dim=32, projection="gaussian", random_state=7)
    assert Gp.shape == (4, 32)
    recs = G.compute_records(net, torch.as_tensor(X), output="loss", y=torch.as_tensor(y),
                             loss=model.loss_fn)
    F_ = scale_features(G.project(recs, Projector("gaussian", 32, seed=7, dtype=torch.float64)), 32)
    np.testing.assert_allclose(Gp, F_[:, 0].numpy(), rtol=1e-12)
    # inner products are preserved on average: a loose sanity bound at k=32
    assert np.abs(np.linalg.norm(Gp, axis=1) / np.linalg.norm(Gfull, axis=1) - 1).max() < 0.8


def test_kron_record_forms_the_bias_column_once():
    """A record with a bias keeps its input once: after ``a`` (input plus a ones column) is
    formed, ``x`` is a view of it; the formed gradient's bias column is the sum of d."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    d = torch.randn(4, 6, 2, 3, generator=g, dtype=torch.float64)
    r = G.KronRecord("w+bias", x.clone(), d, bias=True)
    dense_first = r.dense()  # from x and sum(d), without forming a
    assert "_a" not in r.__dict__
    a = r.a
    assert a.shape == (4, 6, 6) and torch.equal(a[..., -1], torch.ones(4, 6, dtype=torch.float64))
    assert r.x.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    ref = torch.einsum("nlmo,nli->nmoi", d, a).flatten(2)
    torch.testing.assert_close(dense_first, ref, rtol=1e-12, atol=1e-12)
    assert r.n_params == 18 and r.d_in == 6 and r.L == 6
