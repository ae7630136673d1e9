"""RepresentationTracer: the decomposition against a brute-force replay of training, exactness
of weights and layer outputs, digits, projections, bad input, clone / pickle."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

from skattr import TorchModel, TrajectoryRecorder
from skattr.estimators.representation import RepresentationTracer
from skattr.tracing import ClasswiseBatches


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float64), y


def _mlp(bias=False, norm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(64, 12, bias=bias)]
    if norm:
        layers.append(nn.BatchNorm1d(12, affine=norm == "affine"))
    layers += [nn.Tanh(), nn.Linear(12, 10, bias=bias)]
    return nn.Sequential(*layers)


def _cnn(bias=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 9, 10, bias=bias),
    )


def _model(net, **kw):
    kw = {"epochs": 2, "lr": 0.2, "momentum": 0.0, "batch_size": 16, "dtype": "float64",
          "random_state": 0, **kw}
    return TorchModel(net, **kw)


def _weights(module, name, bias):
    mod = dict(module.named_modules())[name]
    W = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    if bias and mod.bias is not None:
        W = torch.cat([W, mod.bias.detach()[:, None]], 1)
    return W


def _initial(model, X, y):
    """W_0 from an independent run with no training (same seed, no recorder)."""
    return clone(model).set_params(epochs=0).fit(X, y).module_


def _layer_io(net, name, X):
    """The input and output of a layer of ``net`` under eval mode (independent hooks)."""
    got = {}
    mod = dict(net.named_modules())[name]
    h = mod.register_forward_hook(lambda m, i, o: got.update(a=i[0].detach().clone(), z=o.detach().clone()))
    with torch.no_grad():
        net.eval()(torch.as_tensor(X))
    h.remove()
    return got["a"], got["z"]


def _apply(mod, W, a):
    """``W * a`` for a weight of the layer's shape (no bias)."""
    if isinstance(mod, nn.Linear):
        return a @ W.T
    return F.conv2d(a, W, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weights_decompose_exactly(digits, kind):
    X, y = digits[0][:120], digits[1][:120]
    model = _model(_mlp() if kind == "mlp" else _cnn())
    tr = RepresentationTracer(model).fit(X, y)
    W0 = _initial(model, X, y)
    plain = clone(model).fit(X, y).module_  # training without the recorder
    for name in tr.layers_:
        WT = _weights(tr.model_.network(), name, True)
        # the hooks do not change training
        torch.testing.assert_close(WT, _weights(plain, name, True), rtol=0, atol=1e-12)
        dW = WT - _weights(W0, name, True)
        S = tr.total_update(name)
        assert float((S - dW).norm() / dW.norm()) < 1e-5
        assert tr.weight_residual_[name] < 1e-10
        # per example, summed over examples, too
        torch.testing.assert_close(tr.example_updates(name).sum(0), dW, rtol=1e-7, atol=1e-10)
    assert tr.layers_ == (["0", "2"] if kind == "mlp" else ["1", "3", "6"])


def test_example_updates_match_a_replay_of_training(digits):
    """sum_t dW_{t,i} against per-example gradients replayed at every step's parameters."""
    X, y = digits[0][:48], digits[1][:48]
    rec = TrajectoryRecorder(checkpoint_every=1)
    model = _model(_mlp(), callbacks=[rec], epochs=2, lr_schedule="linear")
    tr = RepresentationTracer(model).fit(X, y)
    fitted = [cb for cb in tr.model_.callbacks_ if isinstance(cb, TrajectoryRecorder)][0]
    net = tr.model_.network()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def loss(p, x, t):
        return F.cross_entropy(functional_call(net, p, (x[None],)), t[None])

    ref = {n: torch.zeros(len(X), *_weights(net, n, True).shape, dtype=torch.float64) for n in tr.layers_}
    for t, (idx, lr) in enumerate(zip(fitted.batches_, fitted.lrs_)):
        state = fitted.checkpoints_[t][1]
        g = vmap(grad(loss), in_dims=(None, 0, 0))(state, Xt[idx], yt[idx])
        for n in tr.layers_:
            ref[n][idx] += -lr / len(idx) * g[f"{n}.weight"].reshape(len(idx), *ref[n].shape[1:])
    for n in tr.layers_:
        torch.testing.assert_close(tr.example_updates(n), ref[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_contributions_sum_to_p_and_scores_are_projections(digits, kind):
    X, y = digits
    Xtr, ytr, Xte = X[:100], y[:100], X[200:206]
    model = _model(_mlp() if kind == "mlp" else _cnn())
    tr = RepresentationTracer(model).fit(Xtr, ytr)
    net, W0net = tr.model_.network(), _initial(model, Xtr, ytr)
    for name in tr.layers_:
        mod = dict(net.named_modules())[name]
        a, z = _layer_io(net, name, Xte)
        p = z - _apply(mod, dict(W0net.named_modules())[name].weight.detach(), a)
        E = tr.example_updates(name).reshape(tr.n_train_, *mod.weight.shape)
        c = torch.stack([_apply(mod, E[i], a) for i in range(tr.n_train_)])  # (n_train, t, ...)
        rel = (c.sum(0) - p).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1)
        assert float(rel.max()) < 1e-6
        pn = p.flatten(1).norm(dim=1)
        ref = (c.flatten(2) * p.flatten(1)[None]).sum(2).T / pn[:, None]  # ||c|| cos(c, p)
        S = tr.attribute(Xte, layer=name)
        np.testing.assert_allclose(S, ref.numpy(), rtol=1e-7, atol=1e-10 * float(pn.max()))
        np.testing.assert_allclose(S.sum(1), pn.numpy(), rtol=1e-8)
        assert tr.decomposition_residual(Xte)[name].max() < 1e-6
        # over time: the cumulative influence of the steps ends at ||p||
        steps, inf = tr.influence_over_time(Xte, layer=name)
        assert len(steps) == tr.n_steps_
        np.testing.assert_allclose(inf[name].sum(1), pn.numpy(), rtol=1e-8)
    np.testing.assert_allclose(
        tr.attribute(Xte), sum(tr.attribute(Xte, layer=n) for n in tr.layers_), rtol=1e-10)


def test_biases_folded_exact_or_reported(digits):
    X, y = digits[0][:100], digits[1][:100]
    Xte = digits[0][300:310]
    model = _model(_mlp(bias=True, norm="affine"))
    tr = RepresentationTracer(model).fit(X, y)
    assert max(tr.weight_residual_.values()) < 1e-10
    assert max(r.max() for r in tr.decomposition_residual(Xte).values()) < 1e-6
    ex = RepresentationTracer(model, bias="exclude").fit(X, y)
    assert max(ex.weight_residual_.values()) < 1e-10  # the weights alone still decompose
    res = ex.decomposition_residual(Xte)
    # p(x) keeps the bias b_T, which the weight updates do not explain
    for n in ex.layers_:
        mod = dict(ex.model_.network().named_modules())[n]
        a, z = _layer_io(ex.model_.network(), n, Xte)
        W0 = dict(_initial(model, X, y).named_modules())[n].weight.detach()
        p = z - a @ W0.T
        ref = mod.bias.detach().norm() / p.norm(dim=1)
        np.testing.assert_allclose(res[n], ref.numpy(), rtol=1e-8)
        assert res[n].min() > 1e-3


def test_momentum_opt_in_reports_residual_and_updates_mode(digits):
    X, y = digits[0][:100], digits[1][:100]
    model = _model(_mlp(), momentum=0.9, weight_decay=1e-3)
    with pytest.warns(UserWarning, match="weight_residual_"):
        tr = RepresentationTracer(model, momentum_ok=True).fit(X, y)
    assert min(tr.weight_residual_.values()) > 1e-2
    # whole-step updates decompose any optimizer's run exactly (shared by the batch)
    up = RepresentationTracer(model, record="updates").fit(X, y)
    W0 = _initial(model, X, y)
    for n in up.layers_:
        dW = _weights(up.model_.network(), n, True) - _weights(W0, n, True)
        assert float((up.total_update(n) - dW).norm() / dW.norm()) < 1e-10
        torch.testing.assert_close(up.example_updates(n).sum(0), dW)
    S = up.attribute(digits[0][300:305])
    assert S.shape == (5, 100) and np.all(np.isfinite(S))


def test_projection_and_step_every_approximate(digits):
    X, y = digits[0][:200], digits[1][:200]
    Xte = digits[0][300:330]
    net = nn.Sequential(nn.Linear(64, 128, bias=False), nn.Tanh(), nn.Linear(128, 10, bias=False))
    model = _model(net, epochs=3)
    exact = RepresentationTracer(model).fit(X, y)
    S = exact.attribute(Xte)
    proj = RepresentationTracer(model, projection_dim=32, random_state=1).fit(X, y)
    assert np.isnan(list(proj.weight_residual_.values())).all()
    assert proj.record_bytes_ < 0.5 * exact.record_bytes_
    Sp = proj.attribute(Xte)
    corr = np.mean([np.corrcoef(S[j], Sp[j])[0, 1] for j in range(len(Xte))])
    assert corr > 0.5
    sub = RepresentationTracer(model, step_every=3).fit(X, y)
    assert sub.record_bytes_ < 0.5 * exact.record_bytes_
    assert 0 < max(sub.weight_residual_.values()) < 1.0
    with pytest.raises(ValueError, match="exact records"):
        proj.total_update(proj.layers_[0])


def test_digits_top10_share_the_class(digits):
    X, y = digits
    Xtr, ytr, Xte, yte = X[:600], y[:600], X[1000:1200], y[1000:1200]
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = _model(net, epochs=8, lr=0.1, batch_size=32, dtype="float32")
    tr = RepresentationTracer(model).fit(Xtr.astype(np.float32), ytr)
    top = tr.top_k(Xte.astype(np.float32), k=10)
    share = float((ytr[top.proponents] == yte[:, None]).mean())
    assert share > 0.5  # chance is about 0.1
    stats = tr.class_statistics(Xte[:40].astype(np.float32))
    last = stats[tr.layers_[-1]]
    own = (last["classes"][last["influence_by_class"].argmax(1)] == yte[:40]).mean()
    assert own > 0.6
    assert last["cos"].shape == last["weight"].shape == (40, 8 * 600)
    assert np.all(last["weight"] >= 0) and np.all(np.abs(last["cos"]) <= 1 + 1e-6)
    # the paper's form (bias-free layers, batch norm without affine parameters before the ReLU):
    # the last layer's top-10 share the class for over 90 % (0.94 measured; the first layer's do
    # not; benchmarks/README.md, "class agreement", for why the plain MLP above stays near 0.75)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64, affine=False), nn.ReLU(),
                       nn.Linear(64, 10, bias=False))
    tb = RepresentationTracer(_model(bn, epochs=8, lr=0.1, batch_size=32, dtype="float32")).fit(
        Xtr.astype(np.float32), ytr)
    tops = [tb.top_k(Xte.astype(np.float32), k=10, layer=n) for n in tb.layers_]
    shares = [float((ytr[t.proponents] == yte[:, None]).mean()) for t in tops]
    assert shares[-1] > 0.9 and shares[0] < shares[-1]
    S = tb.attribute(Xte.astype(np.float32), layer=tb.layers_[-1])
    np.testing.assert_array_equal(tops[-1].proponents[:, 0], S.argmax(1))
    np.testing.assert_allclose(tops[-1].proponent_scores[:, 0], S.max(1))


# ----------------------------------------------------------------------------- classwise / ghost
def test_classwise_batches_are_single_class_with_ghosts(digits):
    X, y = digits[0][:90], digits[1][:90]
    model = _model(_mlp(), batch_size=10, callbacks=[ClasswiseBatches(y, batch_size=10, ghost=3),
                                                     TrajectoryRecorder()])
    batches = clone(model).fit(X, y).callbacks_[1].batches_
    n_per_epoch = sum(-(-int((y == c).sum()) // 7) for c in np.unique(y))
    assert len(batches) == 2 * n_per_epoch
    for e in range(2):
        seen = []
        for b in batches[e * n_per_epoch:(e + 1) * n_per_epoch]:
            assert len(b) <= 10 and len(b) - 3 >= 1
            assert len(set(y[b[:-3]])) == 1  # the loss part is one class
            seen += list(b[:-3])
        assert sorted(seen) == list(range(len(X)))  # every example once per epoch in the loss
    # the same seed gives the same batches (the trainer's generator)
    for a, b in zip(batches, clone(model).fit(X, y).callbacks_[1].batches_):
        np.testing.assert_array_equal(a, b)


def test_batch_plans_are_checked(digits):
    from skattr.training import Callback

    X, y = digits[0][:20], digits[1][:20]

    class Plan(Callback):
        def __init__(self, plan):
            self.plan = plan

        def plan_epoch(self, state, generator):
            return self.plan

    def fit(*cbs):
        return _model(_mlp(), epochs=1, callbacks=list(cbs)).fit(X, y)

    with pytest.raises(ValueError, match=r"not a non-empty list of indices in \[0, 20\)"):
        fit(Plan([np.arange(5), np.array([3, 20])]))
    with pytest.raises(ValueError, match="loss weights"):
        fit(Plan([(np.arange(4), np.zeros(4))]))
    with pytest.raises(ValueError, match="loss weights"):
        fit(Plan([(np.arange(4), np.ones(3))]))
    with pytest.raises(ValueError, match="Only one callback may plan"):
        fit(Plan(None), ClasswiseBatches(y, 16, 2))
    with pytest.raises(ValueError, match="ghost must be in"):
        fit(ClasswiseBatches(y, 16, 16))
    # a weighted plan trains on the weighted mean: weight 0 rows change nothing
    w = fit(Plan([(np.arange(20), np.r_[np.ones(10), np.zeros(10)])])).module_
    ref = fit(Plan([np.arange(10)])).module_
    for a, b in zip(w.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_classwise_ghost_updates_against_brute_force(digits):
    """Per-example updates of a classwise run with ghosts through batch norm, against per-example
    weight copies differentiated through the masked batch loss at every step's parameters."""
    X, y = digits[0][:60], digits[1][:60]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 12, bias=False), nn.BatchNorm1d(12, affine=False), nn.Tanh(),
                        nn.Linear(12, 10, bias=False))
    rec = TrajectoryRecorder(checkpoint_every=1)
    model = _model(net, callbacks=[rec], epochs=2, batch_size=12, lr_schedule="linear")
    tr = RepresentationTracer(model, batch_mode="classwise", ghost=4).fit(X, y)
    fitted = [cb for cb in tr.model_.callbacks_ if isinstance(cb, TrajectoryRecorder)][0]
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    ref = {n: torch.zeros(len(X), *_weights(net, n, False).shape, dtype=torch.float64) for n in ("0", "3")}
    ghost_rows = 0.0
    for t, (idx, lr) in enumerate(zip(fitted.batches_, fitted.lrs_)):
        state = fitted.checkpoints_[t][1]
        B = len(idx)
        w = torch.cat([torch.ones(B - 4), torch.zeros(4)]).double()
        W1 = state["0.weight"].expand(B, -1, -1).clone().requires_grad_()
        W2 = state["3.weight"].expand(B, -1, -1).clone().requires_grad_()
        h = F.batch_norm(torch.einsum("bi,boi->bo", Xt[idx], W1), None, None, training=True, eps=1e-5)
        z = torch.einsum("bi,boi->bo", torch.tanh(h), W2)
        loss = (F.cross_entropy(z, yt[idx], reduction="none") * w).sum() / w.sum()
        g1, g2 = torch.autograd.grad(loss, [W1, W2])
        assert len(set(y[idx[:-4]])) == 1
        ghost_rows += float(g1[-4:].norm())
        for n, g in (("0", g1), ("3", g2)):
            ref[n].index_add_(0, torch.as_tensor(idx), -lr * g)
    assert ghost_rows > 0  # ghosts reach the first layer's update through the batch statistics
    for n in ("0", "3"):
        torch.testing.assert_close(tr.example_updates(n), ref[n], rtol=1e-9, atol=1e-12)
    # whole-step updates: each shared by the step's single-class part only
    up = RepresentationTracer(model, record="updates", batch_mode="classwise", ghost=4).fit(X, y)
    for r in up.recorder_.records_["3"]:
        assert len(set(y[r.index])) == 1
    torch.testing.assert_close(up.example_updates("3").sum(0), up.total_update("3"))
    assert max(up.weight_residual_.values()) < 1e-10
    S = up.class_statistics(digits[0][300:303])["3"]
    assert set(np.unique(S["label"])) <= set(np.unique(y))


# ----------------------------------------------------------------------------- bad input
def test_bad_input(digits):
    X, y = digits[0][:60], digits[1][:60]
    with pytest.raises(ValueError, match="momentum=0.9.*momentum_ok=True"):
        RepresentationTracer(_model(_mlp(), momentum=0.9)).fit(X, y)
    with pytest.raises(ValueError, match="weight_decay=0.01"):
        RepresentationTracer(_model(_mlp(), weight_decay=0.01)).fit(X, y)
    with pytest.raises(ValueError, match="Layer '1' cannot be traced: Tanh"):
        RepresentationTracer(_model(_mlp()), layers=["0", "1"]).fit(X, y)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        RepresentationTracer(_model(_mlp(norm=True)), layers="1").fit(X, y)
    with pytest.raises(ValueError, match="No submodule named 'nope'"):
        RepresentationTracer(_model(_mlp()), layers=["nope"]).fit(X, y)
    with pytest.raises(ValueError, match="needs the training labels"):
        RepresentationTracer(_model(_mlp())).fit(X)
    with pytest.raises(ValueError, match="ghost=2 needs batch_mode='classwise'"):
        RepresentationTracer(_model(_mlp()), ghost=2).fit(X, y)
    with pytest.raises(ValueError, match="ghost=16 must be less than the model's batch_size=16"):
        RepresentationTracer(_model(_mlp()), batch_mode="classwise", ghost=16).fit(X, y)
    tr = RepresentationTracer(_model(_mlp())).fit(X, y)
    with pytest.raises(ValueError, match="X has 63 features.*expecting 64"):
        tr.attribute(X[:3, :63])
    with pytest.raises(ValueError, match="not traced"):
        tr.attribute(X[:3], layer="1")
    with pytest.raises(ValueError, match="NaN"):
        tr.attribute(np.full((2, 64), np.nan))
    with pytest.raises(ValueError, match="inconsistent"):
        tr.attribute(X[:3], y[:2])


def test_clone_and_pickle(digits):
    X, y = digits[0][:80], digits[1][:80]
    tr = RepresentationTracer(_model(_mlp()), projection_dim=8)
    c = clone(tr)
    assert c.get_params()["projection_dim"] == 8 and c.model is not tr.model
    tr.fit(X, y)
    S = tr.attribute(X[:4])
    back = pickle.loads(pickle.dumps(tr))
    np.testing.assert_array_equal(back.attribute(X[:4]), S)
    np.testing.assert_array_equal(clone(tr).fit(X, y).attribute(X[:4]), S)  # deterministic


def test_plots_write_pngs(digits, tmp_path):
    pytest.importorskip("matplotlib")
    from skattr.plotting import plot_class_ridge, plot_influence_over_time, plot_top_k_images, save

    X, y = digits[0][:100], digits[1][:100]
    Xte = digits[0][300:303]
    tr = RepresentationTracer(_model(_cnn())).fit(X, y)
    stats = tr.class_statistics(Xte)
    pred = tr.model_.predict(Xte)
    paths = [save(plot_class_ridge(stats[tr.layers_[-1]], 0, predicted=pred[0]), tmp_path / "ridge.png")]
    steps, inf = tr.influence_over_time(Xte)
    paths.append(save(plot_influence_over_time(steps, inf, 1), tmp_path / "time.png"))
    top = tr.top_k(Xte, k=4)
    fig = plot_top_k_images(Xte, X, top.proponents, image_shape=(8, 8), y_test=digits[1][300:303],
                            y_train=y, scores=top.proponent_scores)
    paths.append(save(fig, tmp_path / "grid.png"))
    for p in paths:
        assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="steps"):
        plot_influence_over_time(steps[:-1], inf)


# ----------------------------------------------------------------------------- on-disk records
def test_store_records_resume_after_interruption_identically(digits, tmp_path, monkeypatch):
    import skattr.tracing as tracing

    X, y = digits[0][:96], digits[1][:96]
    Xte = digits[0][300:306]
    model = _model(_cnn())  # 2 epochs of 6 steps; the convs keep dense updates, the Linear factors
    mem = RepresentationTracer(model).fit(X, y)
    monkeypatch.setattr(tracing, "_STORE_BLOCK_BYTES", 20_000)  # blocks of a few steps
    full = RepresentationTracer(model, store=tmp_path / "full").fit(X, y)
    assert all(not r for r in full.recorder_.records_.values())  # nothing kept in memory
    assert {k for k in full.recorder_.kinds_.values()} == {"dense", "factors"}
    assert all(st.n_blocks > 2 for st in full.recorder_.stores_.values())
    S = full.attribute(Xte)
    np.testing.assert_allclose(S, mem.attribute(Xte), rtol=1e-10, atol=1e-13)
    for n in mem.layers_:
        torch.testing.assert_close(full.example_updates(n), mem.example_updates(n), rtol=1e-10, atol=1e-14)
    assert full.weight_residual_ == pytest.approx(mem.weight_residual_, abs=1e-12)

    # interrupted in the middle of training (a crash after step 7 of 12) ...
    end = tracing.RepresentationRecorder.on_batch_end

    def crash(self, state):
        end(self, state)
        if state.step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracing.RepresentationRecorder, "on_batch_end", crash)
    with pytest.raises(KeyboardInterrupt):
        RepresentationTracer(model, store=tmp_path / "run").fit(X, y)
    monkeypatch.setattr(tracing.RepresentationRecorder, "on_batch_end", end)
    stores = [p for p in (tmp_path / "run").iterdir()]
    before = {}
    for p in stores:
        for m in p.glob("*.done"):
            before[m] = m.read_text()
    assert 0 < len(before)
    # ... then fitted again with the same folder: the same scores, the finished blocks kept
    res = RepresentationTracer(model, store=tmp_path / "run").fit(X, y)
    np.testing.assert_array_equal(res.attribute(Xte), S)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(res)).attribute(Xte), S)  # reads the folder
    steps, inf = res.influence_over_time(Xte)
    np.testing.assert_array_equal(inf[res.layers_[-1]], full.influence_over_time(Xte)[1][res.layers_[-1]])
    assert len(steps) == 12
    for m, text in before.items():
        assert m.read_text() == text  # not rewritten
    with pytest.raises(ValueError, match="record='factors'"):
        RepresentationTracer(model, store=tmp_path / "u", record="updates").fit(X, y)


def test_store_with_a_damaged_block_is_recorded_again_in_full(digits, tmp_path, monkeypatch):
    """A finished block whose data file was truncated (its marker kept) is recorded again over
    all of its steps, not only the steps after the damage was noticed (a new user's refit
    wrote a block with one step of 80 in it and kept it as finished)."""
    import skattr.tracing as tracing

    X, y = digits[0][:96], digits[1][:96]
    Xte = digits[0][300:306]
    model = _model(_cnn())
    monkeypatch.setattr(tracing, "_STORE_BLOCK_BYTES", 20_000)
    ref = RepresentationTracer(model, store=tmp_path / "a").fit(X, y)
    S = ref.attribute(Xte)
    # the first block of the layer with the most steps per block (not only the first step,
    # which a refit always records again)
    st = max(ref.recorder_.stores_.values(), key=lambda st: st.block_size)
    assert st.block_size > ref.recorder_._layout[st.meta["layer"]]["B"]
    block = st.path / "m000_b000000.f.npy"
    data = block.read_bytes()
    block.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="missing or damaged"):
        again = RepresentationTracer(model, store=tmp_path / "a").fit(X, y)
    np.testing.assert_array_equal(again.attribute(Xte), S)
    assert max(again.weight_residual_.values()) == pytest.approx(max(ref.weight_residual_.values()))
