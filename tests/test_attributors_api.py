"""The attributors as scikit-learn estimators and as kernels: estimator checks, the attribution
kernels' Gram property, surrogates over every method, top_k, the house rules of the core."""

import ast
import pathlib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skattr import TorchModel
from skattr.estimators import TRAK, ConceptProbe, InfluenceFunction, LossKernel, TraceNTK, TracIn
from skattr.estimators.base import AttributionKernel
from skattr.surrogates import KernelSurrogate


def _lazy_model(**kw):
    net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    params = dict(dtype="float64", random_state=0, epochs=3, batch_size=16, lr=0.1)
    params.update(kw)
    return TorchModel(net, **params)


def _attributor_estimators():
    torch.manual_seed(0)
    return [
        TRAK(_lazy_model(), projection_dim=16),
        TRAK(_lazy_model(), projection_dim=None, ridge=0.1),
        TracIn(_lazy_model(), checkpoints="train", projection_dim=16),
        AttributionKernel(TRAK(_lazy_model(), projection_dim=16)),
        InfluenceFunction(_lazy_model(), solver="exact", damping=0.1),
        InfluenceFunction(_lazy_model(), solver="ekfac", projection_dim=16),
    ]


_TORCH_HASH = (
    "joblib.hash of a torch tensor pickles its storage key (its memory address), so the "
    "check's deep copy of the module hashes differently although fit leaves it untouched."
)
_FOUR_LABELS = (
    "the check's y has 4 labels; the output (margin or loss) of a 3-logit network is defined "
    "for labels 0..2 only, so fit raises a ValueError naming the labels and the classes."
)


def _expected_failures(est):
    return {"check_estimators_overwrite_params": _TORCH_HASH, "check_dtype_object": _FOUR_LABELS}


@parametrize_with_checks(_attributor_estimators(), expected_failed_checks=_expected_failures,
                         xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _other_estimators():
    torch.manual_seed(0)
    return [
        LossKernel(_lazy_model(), n_chains=2, n_draws=20, burn_in=5),
        ConceptProbe(_lazy_model()),
    ]


_BINARY_CONCEPT = (
    "a concept is binary by definition: fit(X, concept) raises a ValueError naming the values "
    "when the check passes multi-class y."
)
_CONCEPT_CHECKS = (
    "check_fit_score_takes_y", "check_dont_overwrite_parameters", "check_estimators_fit_returns_self",
    "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
    "check_f_contiguous_array_estimator", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_fit2d_1feature", "check_dict_unchanged",
    "check_fit2d_predict1d", "check_fit2d_1sample",
)
_LOSS_KERNEL_LABELS = (
    "transform(X) without labels evaluates the losses at the network's predictions while "
    "fit_transform(X, y) uses the given labels, so the two differ where the predictions are "
    "wrong (the check's random labels); LossKernel.transform(X, y) with the same labels agrees."
)


def _other_expected_failures(est):
    xf = {"check_estimators_overwrite_params": _TORCH_HASH, "check_dtype_object": _FOUR_LABELS}
    if isinstance(est, ConceptProbe):
        xf.update(dict.fromkeys(_CONCEPT_CHECKS, _BINARY_CONCEPT))
    if isinstance(est, LossKernel):
        for name in ("check_transformer_general", "check_transformer_data_not_an_array"):
            xf[name] = _LOSS_KERNEL_LABELS
        xf["check_n_features_in_after_fitting"] = (
            "the error for a wrong number of features names the fitted trailing shape, not "
            "sklearn's exact wording."
        )
    return xf


# non-strict: which checks a multi-class y breaks depends on the check's data
@parametrize_with_checks(_other_estimators(), expected_failed_checks=_other_expected_failures,
                         xfail_strict=False)
def test_sklearn_estimator_checks_loss_kernel_and_probe(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- kernels
@pytest.fixture(scope="module")
def digits_model():
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float64)
    from skattr import TrajectoryRecorder

    net = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    model = TorchModel(net, epochs=6, lr=0.1, dtype="float64", callbacks=[TrajectoryRecorder()],
                       random_state=0).fit(X[:300], y[:300])
    return X, y, model


def _attributors(model):
    return {
        "trak": TRAK(model, projection_dim=256),
        "trak-exact": TRAK(model, projection_dim=None),
        "trak-3": TRAK(model, projection_dim=128, n_models=3),
        "tracin": TracIn(model),
        "tracin-proj": TracIn(model, projection_dim=256),
        "if-ekfac": InfluenceFunction(model, solver="ekfac", projection_dim=256),
        # damping above minus H's smallest eigenvalue (-0.12 here): H + damping I is PD
        "if-cg": InfluenceFunction(model, solver="cg", damping=1.0),
    }


@pytest.mark.parametrize("name", ["trak", "trak-exact", "trak-3", "tracin", "tracin-proj", "if-ekfac",
                                  "if-cg"])
def test_attribution_kernel_is_a_gram_matrix(digits_model, name):
    X, y, model = digits_model
    att = _attributors(model)[name].fit(X[:120], y[:120])
    K = att.kernel(X[:120])
    np.testing.assert_array_equal(K, K.T)
    ev = np.linalg.eigvalsh(K)
    assert ev.min() >= -1e-8 * ev.max(), (ev.min(), ev.max())
    # the cross kernel is consistent with the training block
    Kc = att.kernel(X[:10], X[:120])
    tol = 1e-4 if name == "if-cg" else 1e-8  # CG solves to tol=1e-5
    np.testing.assert_allclose(Kc, K[:10], rtol=tol, atol=tol * 1e-2 * np.abs(K).max())


@pytest.mark.parametrize("name", ["trak", "tracin", "if-ekfac"])
def test_surrogates_over_attributors_drop_in(digits_model, name):
    X, y, model = digits_model
    sur = KernelSurrogate(_attributors(model)[name], "krr").fit(X[:300])
    tau = sur.score(X[300:400], y[300:400])
    ref = KernelSurrogate(TraceNTK(model), "krr").fit(X[:300]).score(X[300:400], y[300:400])
    assert np.isfinite(tau) and tau > 0.2, (tau, ref)
    assert sur.explain(X[300:302]).shape == (2, 300)
    K = sur.kernel_.transform(X[300:310])
    assert K.shape == (10, 300)


def test_top_k_matches_attribute(digits_model):
    X, y, model = digits_model
    trak = TRAK(model, projection_dim=128).fit(X[:100], y[:100])
    top = trak.top_k(X[200:203], y[200:203], k=4)
    S = trak.attribute(X[200:203], y[200:203])
    for r in range(3):
        np.testing.assert_array_equal(S[r, top.proponents[r]], top.proponent_scores[r])
        assert set(top.proponents[r]) == set(np.argsort(-S[r])[:4])
        assert set(top.opponents[r]) == set(np.argsort(S[r])[:4])
    with pytest.raises(ValueError, match="k must lie"):
        trak.top_k(X[:2], y[:2], k=0)


# ----------------------------------------------------------------------------- the house
ROOT = pathlib.Path(__file__).resolve().parents[1] / "skattr"


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield (node.level, node.module or "")
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield (0, a.name)


def test_core_modules_never_import_estimators():
    """Data flows one way: no module outside skattr/estimators/ (the main job and reports
    aside, which show them) imports an estimator module."""
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("estimators", "reports", "surrogates") or rel.name == "__main__.py":
            continue
        for _level, mod in _imports(path):
            if "estimators" in mod.split("."):
                bad.append(f"{rel}: {mod}")
    assert not bad, bad


def test_estimators_do_not_import_each_other():
    allowed = {"base", "__init__"}
    bad = []
    for path in (ROOT / "estimators").glob("*.py"):
        if path.stem == "__init__":
            continue
        for level, mod in _imports(path):
            if level == 1 and mod and mod.split(".")[0] not in allowed:
                bad.append(f"{path.name}: .{mod}")
    assert not bad, bad


def test_no_private_torchmodel_names_outside_model_py():
    names = ("._network(", "._ready(", "._encode_y(", "._loss_fn", "._classes(")
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in ROOT.rglob("*.py") if p.name != "model.py"
           for n in names if n in p.read_text()]
    assert not bad, bad
