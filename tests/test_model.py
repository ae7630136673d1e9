"""TorchModel: deterministic training, trajectories, lazy and binary modules, inference helpers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import input_for, make_cnn, make_mlp
from torch import nn

from skattr import Callback, TorchModel, TrajectoryRecorder


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.RandomState(0)
    centers = rng.randn(3, 5) * 2
    y = np.repeat(np.arange(3), 20)
    X = (centers[y] + rng.randn(60, 5)).astype(np.float32)
    return X, y


def _net():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module_.state_dict().items()}


# ----------------------------------------------------------------------------- determinism
def test_fit_is_deterministic_given_random_state(blobs):
    X, y = blobs
    a = TorchModel(_net(), epochs=3, batch_size=8, random_state=1).fit(X, y)
    torch.manual_seed(999)  # global RNG state must not matter
    b = TorchModel(_net(), epochs=3, batch_size=8, random_state=1).fit(X, y)
    for k, v in _weights(a).items():
        torch.testing.assert_close(v, _weights(b)[k], rtol=0, atol=0)
    assert a.history_ == b.history_
    c = TorchModel(_net(), epochs=3, batch_size=8, random_state=2).fit(X, y)
    assert not torch.equal(_weights(a)["0.weight"], _weights(c)["0.weight"])
    # refitting the same estimator gives the same network again
    w = _weights(a)
    a.fit(X, y)
    for k, v in w.items():
        torch.testing.assert_close(_weights(a)[k], v, rtol=0, atol=0)


def test_fit_reinitialises_a_copy_and_learns(blobs):
    X, y = blobs
    net = _net()
    w0 = net[0].weight.detach().clone()
    model = TorchModel(net, epochs=20, batch_size=8, lr=0.05, random_state=0).fit(X, y)
    assert torch.equal(net[0].weight, w0)  # the user's module is untouched
    assert model.module_ is not net
    assert model.history_[-1] < model.history_[0]
    assert model.score(X, y) > 0.9
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    assert model.n_features_in_ == 5 and model.input_shape_ == (5,)


def test_warm_start_continues_training(blobs):
    X, y = blobs
    model = TorchModel(_net(), epochs=2, random_state=0, warm_start=True).fit(X, y)
    w1 = _weights(model)
    first_loss = model.history_[0]
    model.fit(X, y)
    assert not torch.equal(_weights(model)["0.weight"], w1["0.weight"])
    assert model.history_[0] < first_loss  # continues from the trained weights


def test_string_labels(blobs):
    X, y = blobs
    labels = np.array(["a", "b", "c"])[y]
    model = TorchModel(_net(), epochs=10, random_state=0).fit(X, labels)
    np.testing.assert_array_equal(model.classes_, ["a", "b", "c"])
    assert set(model.predict(X)) <= {"a", "b", "c"}
    assert model.score(X, labels) > 0.8


# ----------------------------------------------------------------------------- trajectories
def test_trajectory_recorder_is_consistent_with_epochs(blobs):
    X, y = blobs
    rec = TrajectoryRecorder()
    n, bs, epochs = len(X), 16, 3
    model = TorchModel(_net(), epochs=epochs, batch_size=bs, lr=0.1, momentum=0.5,
                       weight_decay=1e-3, lr_schedule="linear", callbacks=[rec],
                       random_state=0).fit(X, y)
    assert not hasattr(rec, "checkpoints_")  # the user's callback is copied, not mutated
    r = model.callbacks_[0]
    steps_per_epoch = -(-n // bs)
    total = epochs * steps_per_epoch
    assert len(r.lrs_) == len(r.batches_) == len(r.losses_) == total
    assert [s for s, _ in r.checkpoints_] == [e * steps_per_epoch for e in range(epochs + 1)]
    # each epoch's batches are a permutation of the training set, in batches of bs
    for e in range(epochs):
        batches = r.batches_[e * steps_per_epoch:(e + 1) * steps_per_epoch]
        assert [len(b) for b in batches] == [bs] * (n // bs) + ([n % bs] if n % bs else [])
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    # linear schedule
    np.testing.assert_allclose(r.lrs_, [0.1 * (1 - t / total) for t in range(total)])
    assert r.momentum_ == 0.5 and r.weight_decay_ == 1e-3
    assert r.n_train_ == n and r.batch_size_ == bs
    # the last checkpoint is the trained network; the first the initialisation
    for k, v in model.module_.state_dict().items():
        torch.testing.assert_close(r.checkpoints_[-1][1][k], v)
    assert not torch.equal(r.checkpoints_[0][1]["0.weight"], r.checkpoints_[-1][1]["0.weight"])
    np.testing.assert_allclose(
        model.history_,
        [np.average(r.losses_[e * steps_per_epoch:(e + 1) * steps_per_epoch],
                    weights=[len(b) for b in r.batches_[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
         for e in range(epochs)],
        rtol=1e-6,
    )


def test_trajectory_replays_plain_sgd(blobs):
    """Checkpoints + batches + learning rates reproduce the updates (plain SGD)."""
    X, y = blobs
    model = TorchModel(_net(), epochs=2, batch_size=16, lr=0.1, momentum=0.0,
                       callbacks=[TrajectoryRecorder(checkpoint_every=1)], dtype="float64",
                       random_state=0).fit(X, y)
    r = model.callbacks_[0]
    assert len(r.checkpoints_) == 1 + len(r.batches_)
    net = _net().double()
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    for t, (idx, lr) in enumerate(zip(r.batches_, r.lrs_)):
        net.load_state_dict(r.checkpoints_[t][1])
        loss = F.cross_entropy(net(Xt[idx]), yt[idx])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        for (name, p), g in zip(net.named_parameters(), grads):
            torch.testing.assert_close(p.detach() - lr * g, r.checkpoints_[t + 1][1][name])


def test_custom_callback_hooks(blobs):
    X, y = blobs
    seen = []

    class Count(Callback):
        def on_train_begin(self, state):
            seen.append("begin")

        def on_batch_begin(self, state):
            seen.append(("b", state.step))

        def on_epoch_end(self, state):
            seen.append(("e", state.epoch))

        def on_train_end(self, state):
            seen.append("end")

    TorchModel(_net(), epochs=2, batch_size=30, callbacks=[Count()], random_state=0).fit(X, y)
    assert seen == ["begin", ("b", 0), ("b", 1), ("e", 0), ("b", 2), ("b", 3), ("e", 1), "end"]


# ----------------------------------------------------------------------------- module kinds
def test_lazy_modules(blobs):
    X, y = blobs
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(3))
    model = TorchModel(net, epochs=5, random_state=0).fit(X, y)
    assert model.module_[0].weight.shape == (8, 5)
    assert isinstance(net[0], nn.LazyLinear)  # the user's module stays lazy
    assert model.predict(X).shape == (60,)
    # an unfitted lazy model materialises deterministically from random_state
    a = TorchModel(nn.Sequential(nn.LazyLinear(3)), dtype="float64", random_state=3)
    b = TorchModel(nn.Sequential(nn.LazyLinear(3)), dtype="float64", random_state=3)
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))
    assert a.module[0].weight.dtype == torch.float64


def test_binary_single_logit(blobs):
    X, y = blobs
    yb = (y == 1).astype(int)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    model = TorchModel(net, epochs=20, batch_size=8, random_state=0).fit(X, yb)
    np.testing.assert_array_equal(model.classes_, [0, 1])
    z = model.decision_function(X)
    P = model.predict_proba(X)
    assert z.shape == (60,) and P.shape == (60, 2)
    np.testing.assert_allclose(P[:, 1], 1 / (1 + np.exp(-z.astype(np.float64))), rtol=1e-5)
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-6)
    np.testing.assert_array_equal(model.predict(X), (z > 0).astype(int))
    assert model.score(X, yb) > 0.9
    with torch.no_grad():
        ref = F.binary_cross_entropy_with_logits(torch.as_tensor(z), torch.as_tensor(yb).float(),
                                                 reduction="none")
    np.testing.assert_allclose(model.per_example_loss(X, yb), ref.numpy(), rtol=1e-5)
    # a binary net with labels given as strings
    model2 = TorchModel(net, epochs=2, random_state=0).fit(X, np.where(yb, "yes", "no"))
    assert set(model2.predict(X)) <= {"yes", "no"}


def test_too_few_logits_for_the_classes(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="y has 3 classes but the module outputs 1 logit"):
        TorchModel(nn.Linear(5, 1)).fit(X, y)
    with pytest.raises(ValueError, match="y has 3 classes but the module outputs 2 logit"):
        TorchModel(nn.Linear(5, 2)).fit(X, y)


def test_regression(blobs):
    X, _ = blobs
    rng = np.random.RandomState(0)
    w = rng.randn(5, 2)
    Y = X @ w
    model = TorchModel(nn.Linear(5, 2), task="regression", epochs=50, batch_size=8, lr=0.01,
                       random_state=0).fit(X, Y)
    assert model.score(X, Y) > 0.95
    assert model.predict(X).shape == (60, 2)
    assert model.__sklearn_tags__().estimator_type == "regressor"
    with pytest.raises(AttributeError, match="only available for task='classification'"):
        model.predict_proba(X)
    # one output: predictions are 1-D like sklearn regressors
    m1 = TorchModel(nn.Linear(5, 1), task="regression", epochs=2, random_state=0).fit(X, Y[:, 0])
    assert m1.predict(X).shape == (60,)


def test_pretrained_module_used_as_is():
    net = make_cnn(dtype=torch.float32)
    X = input_for("cnn", 5, dtype=torch.float32)
    model = TorchModel(net)
    with torch.no_grad():
        z = net(torch.as_tensor(X))
    np.testing.assert_allclose(model.decision_function(X), z.numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.predict_proba(X), torch.softmax(z, 1).numpy(), rtol=1e-5)
    np.testing.assert_array_equal(model.predict(X), z.argmax(1).numpy())
    assert model.logits(X).shape == (5, 3)


def test_float64_and_tensor_inputs():
    net = make_mlp()
    X = input_for("mlp", 5)
    model = TorchModel(net, dtype="float64")
    z1 = model.decision_function(X)
    z2 = model.decision_function(torch.as_tensor(X))
    z3 = model.decision_function(X.astype(np.float32).tolist())
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_allclose(z1, z3, rtol=1e-6)
    assert z1.dtype == np.float64


def test_batch_size_eval_does_not_change_outputs():
    net = make_cnn()
    X = input_for("cnn", 7)
    a = TorchModel(net, dtype="float64", batch_size_eval=2).decision_function(X)
    b = TorchModel(net, dtype="float64", batch_size_eval=100).decision_function(X)
    np.testing.assert_allclose(a, b, rtol=1e-12)


# ----------------------------------------------------------------------------- helpers
def test_activations_and_embeddings():
    net = make_cnn()
    X = input_for("cnn", 4)
    model = TorchModel(net, dtype="float64")
    with torch.no_grad():
        Xt = torch.as_tensor(X)
        conv = net[0](Xt)
        hidden = net[:7](Xt)
    np.testing.assert_allclose(model.activations(X, "0"), conv.numpy(), rtol=1e-12)
    assert model.activations(X, "1").shape == (4, 4, 3, 3)
    assert model.embedding_layer() == "7"
    E = model.embeddings(X)
    np.testing.assert_allclose(np.asarray(E), hidden.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(model.embeddings(X, layer="6")), net[:6](Xt).detach().numpy(),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="No submodule named 'nope'"):
        model.activations(X, "nope")


def test_device_auto_on_cpu():
    model = TorchModel(make_mlp(dtype=torch.float32))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device_.type == expected
    X = input_for("mlp", 3, dtype=torch.float32)
    assert model.logits(X).device.type == expected
    assert TorchModel(make_mlp(), device="cpu").device_ == torch.device("cpu")


def test_fingerprint_tracks_weights_and_settings():
    net = make_mlp()
    a = TorchModel(net, dtype="float64").fingerprint()
    assert TorchModel(make_mlp(), dtype="float64").fingerprint() == a
    assert TorchModel(net, dtype="float64", params="0.").fingerprint() != a
    other = make_mlp(seed=1)
    assert TorchModel(other, dtype="float64").fingerprint() != a


def test_get_params_and_set_params():
    model = TorchModel(make_mlp(), epochs=3)
    p = model.get_params()
    assert p["epochs"] == 3 and p["task"] == "classification" and p["device"] == "auto"
    model.set_params(lr=0.5)
    assert model.lr == 0.5


def test_to_tensor_copies_negative_strides():
    """A reversed one-row slice counts as contiguous for numpy but has a negative stride, which
    torch cannot wrap: it is copied."""
    X = np.arange(15, dtype=np.float32).reshape(5, 3)
    m = TorchModel(torch.nn.Linear(3, 2))
    np.testing.assert_array_equal(m.to_tensor(X[:1][::-1]).numpy(), X[:1])
    np.testing.assert_array_equal(m.to_tensor(X[::-1]).numpy(), X[::-1])
