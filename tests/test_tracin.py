"""TracIn: against brute-force autograd, captum's TracInCP / TracInCPFast, projections, bad input."""

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from torch.func import functional_call, grad, vmap

from skattr import TorchModel, TrajectoryRecorder
from skattr.estimators import TracIn


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float64), y


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    net = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10))
    model = TorchModel(net, epochs=3, lr=0.1, batch_size=32, lr_schedule="linear", dtype="float64",
                       callbacks=[TrajectoryRecorder()], random_state=0)
    return model.fit(X[:150], y[:150])


def _per_example_grads(net, state, X, y, names=None):
    params = {k: v for k, v in state.items() if names is None or k in names}
    rest = {k: v for k, v in state.items() if k not in params}

    def loss(p, x, t):
        z = functional_call(net, {**p, **rest}, (x[None],))
        return torch.nn.functional.cross_entropy(z, t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.as_tensor(X), torch.as_tensor(y))
    return torch.cat([g[k].reshape(len(X), -1) for k in params], 1).numpy()


def _brute_force(model, X, y, Xt, yt, names=None):
    net = copy.deepcopy(model.module_)
    S = 0.0
    for sd, lr in model.callbacks_[0].tracin_checkpoints():
        G = _per_example_grads(net, sd, X, y, names)
        Gt = _per_example_grads(net, sd, Xt, yt, names)
        S = S + lr * Gt @ G.T
    return S


def test_equals_brute_force_autograd(digits, fitted):
    X, y = digits
    tr = TracIn(fitted).fit(X[:150], y[:150])
    S = tr.attribute(X[300:310], y[300:310])
    ref = _brute_force(fitted, X[:150], y[:150], X[300:310], y[300:310])
    np.testing.assert_allclose(S, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    rec = fitted.callbacks_[0]
    np.testing.assert_allclose(tr.learning_rates_, [lr for _, lr in rec.tracin_checkpoints()])
    # a linear schedule: the checkpoints' rates differ, so this is not a plain sum
    assert len(set(tr.learning_rates_.round(12))) == 3


def test_self_influence_and_top_k(digits, fitted):
    X, y = digits
    tr = TracIn(fitted).fit(X[:150], y[:150])
    si = tr.self_influence()
    ref = _brute_force(fitted, X[:150], y[:150], X[:150], y[:150])
    np.testing.assert_allclose(si, np.diag(ref), rtol=1e-9)
    top = tr.top_k(X[300:304], y[300:304], k=5)
    S = tr.attribute(X[300:304], y[300:304])
    assert top.proponents.shape == (4, 5)
    np.testing.assert_array_equal(top.proponent_scores, np.sort(S, 1)[:, ::-1][:, :5])
    np.testing.assert_array_equal(top.opponent_scores, np.sort(S, 1)[:, :5])
    assert (top.proponent_scores[:, 0] >= top.opponent_scores[:, 0]).all()


def _captum_setup(fitted, X, y, tmp_path):
    paths = []
    for i, (sd, lr) in enumerate(fitted.callbacks_[0].tracin_checkpoints()):
        p = tmp_path / f"ck{i}.pt"
        torch.save({"sd": sd, "lr": lr}, p)
        paths.append(str(p))

    def load(model, path):
        ck = torch.load(path)
        model.load_state_dict(ck["sd"])
        return ck["lr"]

    ds = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    return copy.deepcopy(fitted.module_), ds, paths, load


def test_equals_captum_tracincp(digits, fitted, tmp_path):
    captum_influence = pytest.importorskip("captum.influence")
    X, y = digits
    net, ds, paths, load = _captum_setup(fitted, X[:150], y[:150], tmp_path)
    cap = captum_influence.TracInCP(
        net, ds, checkpoints=paths, checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=50,
    )
    ref = cap.influence((torch.as_tensor(X[300:310]), torch.as_tensor(y[300:310])), k=None).numpy()
    tr = TracIn(fitted).fit(X[:150], y[:150])
    np.testing.assert_allclose(tr.attribute(X[300:310], y[300:310]), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(tr.self_influence(), cap.self_influence().numpy(), rtol=1e-5)


def test_last_layer_equals_captum_tracincp_fast(digits, fitted, tmp_path):
    captum_influence = pytest.importorskip("captum.influence")
    X, y = digits
    net, ds, paths, load = _captum_setup(fitted, X[:150], y[:150], tmp_path)
    cap = captum_influence.TracInCPFast(
        net, net[2], ds, checkpoints=paths, checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=50,
    )
    ref = cap.influence((torch.as_tensor(X[300:310]), torch.as_tensor(y[300:310])), k=None).numpy()
    tr = TracIn(fitted, last_layer=True).fit(X[:150], y[:150])
    assert tr.feature_dim_ == 12 * 10  # the last layer's weight only
    np.testing.assert_allclose(tr.attribute(X[300:310], y[300:310]), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
    brute = _brute_force(fitted, X[:150], y[:150], X[300:310], y[300:310], names={"2.weight"})
    np.testing.assert_allclose(tr.attribute(X[300:310], y[300:310]), brute, rtol=1e-9,
                               atol=1e-12 * np.abs(brute).max())


def test_given_checkpoints_equal_the_recorder(digits, fitted):
    X, y = digits
    pairs = fitted.callbacks_[0].tracin_checkpoints()
    a = TracIn(fitted).fit(X[:150], y[:150]).attribute(X[300:305], y[300:305])
    b = TracIn(fitted, checkpoints=pairs).fit(X[:150], y[:150]).attribute(X[300:305], y[300:305])
    c = TracIn(fitted, checkpoints=fitted.callbacks_[0]).fit(X[:150], y[:150]).attribute(X[300:305], y[300:305])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("projection", ["kronecker", "factored"])
def test_projected_converges_to_exact(digits, fitted, projection):
    X, y = digits
    exact = TracIn(fitted).fit(X[:150], y[:150]).attribute(X[300:320], y[300:320])
    errs = []
    for k in (16, 128, 1024):
        S = TracIn(fitted, projection_dim=k, projection=projection).fit(X[:150], y[:150]).attribute(
            X[300:320], y[300:320])
        errs.append(np.linalg.norm(S - exact) / np.linalg.norm(exact))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.2, errs


def test_kernel_training_block_is_a_gram_matrix(digits, fitted):
    X, y = digits
    tr = TracIn(fitted, projection_dim=256).fit(X[:150], y[:150])
    K = tr.kernel(X[:150])
    np.testing.assert_array_equal(K, K.T)
    ev = np.linalg.eigvalsh(K)
    assert ev.min() >= -1e-9 * ev.max()
    # the kernel is the attribution at the predicted labels (TracIn has no reweighting)
    pred = fitted.predict(X[:20])
    tr2 = TracIn(fitted, projection_dim=256).fit(X[:20], pred)
    np.testing.assert_allclose(tr2.kernel(X[:20]), tr2.attribute(X[:20], pred), rtol=1e-9, atol=1e-12)


def test_clone_and_pickle_round_trip(digits, fitted):
    X, y = digits
    tr = TracIn(fitted, projection_dim=64).fit(X[:150], y[:150])
    S = tr.attribute(X[300:305], y[300:305])
    again = pickle.loads(pickle.dumps(tr))
    np.testing.assert_array_equal(again.attribute(X[300:305], y[300:305]), S)
    c = clone(tr).fit(X[:150], y[:150])
    np.testing.assert_array_equal(c.attribute(X[300:305], y[300:305]), S)


def test_same_random_state_across_batch_sizes(digits, fitted):
    X, y = digits
    a = TracIn(fitted, projection_dim=64, batch_size=7).fit(X[:150], y[:150]).attribute(X[300:305], y[300:305])
    b = TracIn(fitted, projection_dim=64, batch_size=150).fit(X[:150], y[:150]).attribute(X[300:305], y[300:305])
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_bad_checkpoints(digits, fitted):
    X, y = digits
    with pytest.raises(ValueError, match="TrajectoryRecorder"):
        TracIn(TorchModel(copy.deepcopy(fitted.module_), dtype="float64")).fit(X[:50], y[:50])
    rec = fitted.callbacks_[0]
    # the recorder's own (step, state_dict) pairs carry no learning rate
    with pytest.raises(ValueError, match="learning_rate"):
        TracIn(fitted, checkpoints=rec.checkpoints_).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="learning_rate"):
        TracIn(fitted, checkpoints=[sd for sd, _ in rec.tracin_checkpoints()]).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="learning rate"):
        TracIn(fitted, checkpoints=[(rec.checkpoints_[1][1], -0.1)]).fit(X[:50], y[:50])
    other = torch.nn.Sequential(torch.nn.Linear(64, 7), torch.nn.Tanh(), torch.nn.Linear(7, 10))
    with pytest.raises(ValueError, match=r"checkpoints\[0\].*does not match"):
        TracIn(fitted, checkpoints=[(other.state_dict(), 0.1)]).fit(X[:50], y[:50])
    # a fitted TorchModel of another architecture is refused too (it used to pass unchecked)
    other_model = TorchModel(other, epochs=1, dtype="float64", random_state=0).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match=r"checkpoints\[0\] does not match the model's network"):
        TracIn(fitted, checkpoints=[(other_model, 0.1)]).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="labels"):
        TracIn(fitted).fit(X[:50])


@pytest.mark.parametrize("kw", [{}, {"projection_dim": 32}, {"last_layer": True}])
def test_nan_checkpoint_is_an_error_not_nan_scores(digits, fitted, kw):
    X, y = digits
    pairs = fitted.callbacks_[0].tracin_checkpoints()
    sd = copy.deepcopy(pairs[1][0])
    name = next(n for n, v in sd.items() if v.ndim == 2)
    sd[name][0, 0] = float("nan")
    ck = [pairs[0], (sd, pairs[1][1])]
    with pytest.raises(FloatingPointError, match=r"checkpoints\[1\] has NaN"):
        TracIn(fitted, checkpoints=ck, **kw).fit(X[:50], y[:50])


def test_n_jobs_equals_one_process(digits, fitted, monkeypatch):
    """One job per checkpoint on 2 loky processes (exact scores from the layers' records: the
    training records at fit, each checkpoint's term of attribute and kernel), and 2 threads
    featurising blocks of projected features: equal to one process bit for bit; the
    checkpoints' jobs run in workers (threads, counted)."""
    import threading

    import joblib

    import skattr.estimators.tracin as tracin_mod

    X, y = digits
    Xtr, ytr, Xt, yt = X[:150], y[:150], X[150:160], y[150:160]
    ref = TracIn(fitted, n_jobs=1).fit(Xtr, ytr)
    with joblib.parallel_config(backend="loky"):
        par = TracIn(fitted, n_jobs=2).fit(Xtr, ytr)
        S, K = par.attribute(Xt, yt), par.kernel(Xt, Xtr[:20])
    assert par.scoring_ == "records" and len(par.models_) == 3
    np.testing.assert_array_equal(S, ref.attribute(Xt, yt))
    np.testing.assert_array_equal(K, ref.kernel(Xt, Xtr[:20]))
    np.testing.assert_array_equal(par.self_influence(), ref.self_influence())
    ran = []
    for name in ("_records", "_checkpoint_gram"):
        f = getattr(tracin_mod, name)
        monkeypatch.setattr(tracin_mod, name, lambda *a, f=f, name=name: ran.append(
            (name, threading.get_ident())) or f(*a))
    with joblib.parallel_config(backend="threading", n_jobs=2):
        np.testing.assert_array_equal(TracIn(fitted).fit(Xtr, ytr).attribute(Xt, yt), S)
    # fit: the training records of 3 checkpoints; attribute: 3 terms, each with its targets' records
    assert sorted(n for n, _ in ran) == ["_checkpoint_gram"] * 3 + ["_records"] * 6
    assert threading.get_ident() not in {t for _, t in ran}
    kw = dict(projection_dim=32, block_size=40)
    ref = TracIn(fitted, **kw, n_jobs=1).fit(Xtr, ytr)
    with joblib.parallel_config(backend="threading"):
        par = TracIn(fitted, **kw, n_jobs=2).fit(Xtr, ytr)
        np.testing.assert_array_equal(par.attribute(Xt, yt), ref.attribute(Xt, yt))
        np.testing.assert_array_equal(par.top_k(Xt, yt, k=5).proponents,
                                      ref.top_k(Xt, yt, k=5).proponents)
