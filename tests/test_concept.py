"""Concept probes, the probe as a TRAK output, and remove-and-retrain."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from torch.func import functional_call, jacrev

from skattr import TorchModel
from skattr.estimators.concept import ConceptProbe, ProbeOutput, remove_and_retrain
from skattr.estimators.trak import TRAK


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float64")[:400]
    y = y[:400]
    return X, y, np.isin(y, [0, 6, 8, 9]).astype(int)


def _template():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 12), torch.nn.ReLU(),
        torch.nn.Linear(12, 10),
    )
    return TorchModel(net, dtype="float64", epochs=8, lr=0.1, batch_size=32, random_state=0)


@pytest.fixture(scope="module")
def model(digits):
    X, y, _ = digits
    return _template().fit(X, y)


def test_probes_per_layer(digits, model):
    X, _, c = digits
    l1 = ConceptProbe(model, C=0.1, penalty="l1").fit(X, c)
    l2 = ConceptProbe(model, C=0.1, penalty="l2").fit(X, c)
    assert l1.layers_ == ["1", "3"]
    for layer in l1.layers_:
        assert l1.accuracy_[layer] > l1.chance_ + 0.1
        assert l1.sparsity_[layer] >= l2.sparsity_[layer]
        assert 0 < l1.n_active_[layer] <= l1.n_dims_[layer]
    assert l1.best_layer_ in l1.layers_
    rows = l1.summary()
    assert [r["layer"] for r in rows] == l1.layers_ and set(rows[0]) >= {"accuracy", "sparsity"}
    assert 0.5 < l1.score(X, c) <= 1.0
    # clone keeps the trained network; pickling keeps the probes
    np.testing.assert_allclose(clone(l1).fit(X, c).decision_function(X), l1.decision_function(X))
    np.testing.assert_allclose(pickle.loads(pickle.dumps(l1)).decision_function(X[:5]),
                               l1.decision_function(X[:5]))


def test_probe_output_is_the_probe_logit(digits, model):
    X, _, c = digits
    probe = ConceptProbe(model, layers=["1", "3"]).fit(X, c)
    for layer in ("1", "3"):
        out = probe.output_function(layer)
        net = out.network(model.network())
        with torch.no_grad():
            z = net(torch.as_tensor(X[:20]))[:, 0].numpy()
        np.testing.assert_allclose(z, probe.decision_function(X[:20], layer), rtol=1e-9, atol=1e-9)


def test_trak_of_probe_equals_numpy_formula(digits, model):
    X, _, c = digits
    probe = ConceptProbe(model, layers=["1"]).fit(X, c)
    out = probe.output_function("1")
    Xtr, ctr, Xte, cte = X[:60], c[:60], X[300:305], c[300:305]
    trak = TRAK(model, projection_dim=None, output=out, ridge=1e-2).fit(Xtr, ctr)
    S = trak.attribute(Xte, cte)

    mod = model.module_
    first = {k: v.detach() for k, v in mod.named_parameters() if k.startswith("0.")}
    w = torch.as_tensor(out.coef)

    def f(p, x, cc):
        h = torch.relu(functional_call(mod[0], ({k[2:]: v for k, v in p.items()},), (x[None],))[0])
        return (2 * cc - 1) * (h @ w + out.intercept)

    def grads(Xa, ca):
        rows = []
        for x, cc in zip(torch.as_tensor(Xa), ca):
            J = jacrev(f)(first, x, float(cc))
            rows.append(torch.cat([J[k].reshape(-1) for k in first]))
        return torch.stack(rows).numpy()

    Phi, g = grads(Xtr, ctr), grads(Xte, cte)
    assert trak.feature_dim_ == Phi.shape[1]  # only the layers below the probe count
    lam = 1e-2 * (Phi**2).sum(1).mean()
    margin = (2 * ctr - 1) * probe.decision_function(Xtr, "1")
    q = 1 - 1 / (1 + np.exp(-margin))  # the probe's logistic-loss reweighting
    ref = g @ np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1])) @ Phi.T * q
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(trak.q_, q, rtol=1e-8)


def test_probe_output_bad_input(digits, model):
    X, y, c = digits
    out = ConceptProbe(model, layers=["1"]).fit(X, c).output_function()
    with pytest.raises(ValueError, match="concept must be binary"):
        TRAK(model, output=out, projection_dim=16).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="tied to the network"):
        TRAK(model, models=[model, model], output=out, projection_dim=16).fit(X[:50], c[:50])
    with pytest.raises(ValueError, match="not a submodule"):
        TRAK(model, output=ProbeOutput("nope", np.zeros(3), 0.0)).fit(X[:50], c[:50])
    with pytest.raises(ValueError, match="No submodule named"):
        ConceptProbe(model, layers=["9"]).fit(X, c)
    with pytest.raises(ValueError, match="single value"):
        ConceptProbe(model).fit(X, np.zeros(len(X), dtype=int))


def test_remove_and_retrain(digits, model):
    X, y, c = digits
    probe = ConceptProbe(model, layers=["1", "3"])
    scores = np.random.default_rng(0).normal(size=len(X))
    res = remove_and_retrain(
        _template().set_params(epochs=3), X, y, c, scores, fractions=(0.1,), n_seeds=2,
        probe=probe, random_state=0,
    )
    rows = res["rows"]
    # (baseline + top + random) x 2 seeds x 2 layers
    assert len(rows) == 3 * 2 * 2
    assert {r["condition"] for r in rows} == {"baseline", "top", "random"}
    assert all(r["k"] == 40 for r in rows if r["condition"] != "baseline")
    np.testing.assert_array_equal(np.sort(res["removed"][0.1]), np.sort(np.argsort(-scores)[:40]))
    summ = res["summary"]
    assert len(summ) == 3 * 2 and all(s["n_seeds"] == 2 for s in summ)
    assert all(0 <= s["accuracy_mean"] <= 1 and s["best_layer"] in ("1", "3") for s in summ)
    with pytest.raises(ValueError, match="scores has 3 entries"):
        remove_and_retrain(model, X, y, c, scores[:3])
    with pytest.raises(ValueError, match="fractions must lie in"):
        remove_and_retrain(model, X, y, c, scores, fractions=(1.5,))
