"""TRAK's SingleModelWarning: one model that fits its training set, and nothing otherwise.

The networks are trained here; whether a network "fits its training set" is measured
independently of TRAK, from the network's own predicted probabilities (``predict_proba``).
"""

import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_classification
from torch import nn

import skattr
from skattr import SingleModelWarning, TorchModel
from skattr.estimators import TRAK

FITTED = 0.01  # the documented criterion: median of 1 - p(true class) below 0.01


def _digits(n=300):
    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16).astype(np.float32), y[:n]


def _mlp(X, y, epochs, lr=0.05, width=64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(X.shape[1], width), nn.ReLU(), nn.Linear(width, int(y.max()) + 1))
    return TorchModel(net, epochs=epochs, lr=lr, momentum=0.9, batch_size=32, random_state=0).fit(X, y)


def _one_minus_p(model, X, y):
    """1 - p(true class) per example, from the network's probabilities (not from TRAK)."""
    P = model.predict_proba(X)
    return 1.0 - P[np.arange(len(y)), np.searchsorted(model.class_labels(), y)]


def _fit_recording(est, X, y):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        est.fit(X, y)
    return [w for w in rec if issubclass(w.category, SingleModelWarning)]


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def fitted(digits):
    X, y = digits
    return _mlp(X, y, epochs=30)


def test_warning_class_is_exported_user_warning():
    assert issubclass(skattr.SingleModelWarning, UserWarning)
    assert "SingleModelWarning" in skattr.__all__


def test_one_fitted_model_warns_once_with_what_it_measured(digits, fitted):
    X, y = digits
    q = _one_minus_p(fitted, X, y)
    assert fitted.score(X, y) > 0.98 and np.median(q) < FITTED  # the network fits its training set
    rec = _fit_recording(TRAK(fitted, projection_dim=64), X, y)
    assert len(rec) == 1  # once per fit, not once per block or model
    msg = str(rec[0].message)
    # the figures in the text are the network's, measured independently here
    assert f"{np.mean(q < FITTED):.0%} of the {len(y)} training examples" in msg
    median = float(re.search(r"median ([0-9.e+-]+)\)", msg).group(1))
    assert median == pytest.approx(np.median(q), rel=0.06)
    for advice in ("n_models>=4", "TracIn", "InfluenceFunction", "HYDRA"):
        assert advice in msg
    # the warning points at the caller's fit, not into skattr
    assert rec[0].filename == __file__


def test_one_given_model_warns(digits, fitted):
    X, y = digits
    assert len(_fit_recording(TRAK(fitted, models=[fitted], projection_dim=64), X, y)) == 1
    state = {k: v.clone() for k, v in fitted.network().state_dict().items()}
    assert len(_fit_recording(TRAK(fitted, models=[(30, state)], projection_dim=64), X, y)) == 1


def test_no_warning_with_two_models(digits, fitted):
    X, y = digits
    est = TRAK(fitted, n_models=2, projection_dim=64)
    assert _fit_recording(est, X, y) == []
    assert len(est.models_) == 2
    # two given models: the criterion is not applied to ensembles either
    assert _fit_recording(TRAK(fitted, models=[fitted, fitted], projection_dim=64), X, y) == []


def test_no_warning_for_an_underfitting_network(digits):
    X, y = digits
    weak = _mlp(X, y, epochs=1, lr=0.005)
    q = _one_minus_p(weak, X, y)
    assert np.median(q) > 10 * FITTED  # far from fitting its training set
    assert _fit_recording(TRAK(weak, projection_dim=64), X, y) == []


def test_no_warning_without_the_one_minus_p_weights(digits, fitted):
    """A fixed class's logit or a callable output carries no 1 - p weights to vanish."""
    X, y = digits
    assert _fit_recording(TRAK(fitted, output=3, projection_dim=64), X, y) == []
    assert _fit_recording(TRAK(fitted, output=lambda z, t: z[:, 0], projection_dim=64), X, y) == []


@pytest.mark.parametrize("data", ["digits", "make_classification"])
def test_warning_follows_the_fit_of_the_network(data):
    """Across training lengths, TRAK-1 warns exactly when the network's median 1 - p is below
    the threshold; the sweep contains networks on both sides of it."""
    if data == "digits":
        X, y = _digits(200)
    else:
        X, y = make_classification(n_samples=200, n_features=20, n_informative=10, n_classes=3,
                                   random_state=0)
        X = X.astype(np.float32)
    seen = set()
    for epochs in (1, 4, 40):
        model = _mlp(X, y, epochs=epochs, lr=0.05)
        fits = bool(np.median(_one_minus_p(model, X, y)) < FITTED)
        seen.add(fits)
        assert bool(_fit_recording(TRAK(model, projection_dim=32), X, y)) == fits, epochs
    assert seen == {True, False}


def test_untrained_single_model_warns(digits, fitted):
    """TRAK(template) with n_models=None attributes the template's network as it is: when that
    network was never trained it predicts at chance, which is said (a new user got no word)."""
    from skattr import UntrainedModelWarning

    X, y = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    template = TorchModel(net, epochs=5, lr=0.05, random_state=0)  # never fitted
    p_true = 1.0 - _one_minus_p(template, X, y)
    assert np.median(p_true) < 1.25 / 10  # measured without TRAK: at chance
    with pytest.warns(UntrainedModelWarning, match=r"no better than chance.*fitted"):
        TRAK(template, projection_dim=64).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedModelWarning)
        warnings.simplefilter("ignore", SingleModelWarning)
        TRAK(fitted, projection_dim=64).fit(X, y)
        TRAK(template, n_models=2, projection_dim=64).fit(X, y)


def test_a_refit_of_the_same_fit_does_not_repeat_the_warning(digits, fitted):
    """AttributionKernel and KernelSurrogate refit a clone of the TRAK they are given: on the
    data the user fitted it on, that is the user's fit again, and its warning is not repeated
    (before: printed twice). A fit on other data, or the user's own refit, warns again."""
    from skattr.estimators import AttributionKernel
    from skattr.surrogates import KernelSurrogate

    X, y = digits
    tr = TRAK(fitted, projection_dim=64)
    assert len(_fit_recording(tr, X, y)) == 1
    assert _fit_recording(AttributionKernel(tr), X, y) == []
    assert _fit_recording(KernelSurrogate(tr, "krr"), X, y) == []  # clone of a clone
    assert len(_fit_recording(AttributionKernel(TRAK(fitted, projection_dim=64)), X, y)) == 1
    assert len(_fit_recording(AttributionKernel(tr), X[:250], y[:250])) == 1
    assert len(_fit_recording(tr, X, y)) == 1


def _message_strings():
    """Every string constant of skattr's code that is not a docstring (messages, mostly)."""
    import ast
    from pathlib import Path

    root = Path(skattr.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                yield f"{path.name}:{n.lineno}", n.value


def test_messages_name_documentation_pages_not_repository_paths(digits, fitted):
    """A pip user has no docs/ folder: messages name the page as the site builds it
    (``trak.html``), and every page so named exists in the documentation's sources."""
    from pathlib import Path

    X, y = digits
    msg = str(_fit_recording(TRAK(fitted, projection_dim=64), X, y)[0].message)
    assert "trak.html#how-many-models" in msg and "docs/" not in msg
    src = Path(__file__).resolve().parent.parent / "docs"
    assert "\n## How many models\n" in (src / "trak.md").read_text()  # the anchor's heading
    for where, s in _message_strings():
        assert "docs/" not in s, where
        for page in re.findall(r"\b([A-Za-z_]+)\.html\b", s):
            if page not in ("report",):  # the main job's own output file
                assert (src / f"{page}.md").exists() or (src / f"{page}.rst").exists(), where
