"""Bad input gets a clear error that names the problem."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import input_for, make_cnn, make_mlp
from sklearn.exceptions import NotFittedError
from torch import nn

import skattr._validation as validation
from skattr import TorchModel
from skattr.estimators import (
    EmbeddingKernel,
    EmpiricalNTK,
    GradCosKernel,
    PseudoNTK,
    TraceNTK,
)
from skattr.surrogates import KernelSurrogate

KERNELS = [TraceNTK, PseudoNTK, EmpiricalNTK, GradCosKernel, EmbeddingKernel]


@pytest.fixture
def data():
    X = input_for("mlp", 6)
    y = np.arange(6) % 3
    return TorchModel(make_mlp(), dtype="float64"), X, y


def _with_bad(X, value, where=(1, 2)):
    X = X.copy()
    X[where] = value
    return X


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity"), (-np.inf, "infinity")])
@pytest.mark.parametrize("cls", KERNELS + [KernelSurrogate])
def test_non_finite_inputs_to_kernels(data, cls, value, word):
    model, X, y = data
    # (a kernel ridge surrogate: it regresses the random network's logits, whatever they are)
    make = (lambda: KernelSurrogate(TraceNTK(model), "krr")) if cls is KernelSurrogate else (lambda: cls(model))
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        make().fit(_with_bad(X, value))
    fitted = make().fit(X)
    method = fitted.predict if cls is KernelSurrogate else fitted.transform
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        method(_with_bad(X, value))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_to_torchmodel(data, value):
    model, X, y = data
    Xb = _with_bad(X, value)
    for call in (
        lambda: TorchModel(make_mlp(), dtype="float64").fit(Xb, y),
        lambda: model.predict(Xb),
        lambda: model.predict_proba(Xb),
        lambda: model.per_example_loss(Xb, y),
        lambda: model.per_example_gradients(Xb),
        lambda: model.activations(Xb, "0"),
    ):
        with pytest.raises(ValueError, match="Input X contains (NaN|infinity)"):
            call()
    # tensors too
    with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
        model.per_example_gradients(torch.as_tensor(Xb))
    with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
        TraceNTK(model).fit(torch.as_tensor(Xb))


def test_non_finite_targets(data):
    _, X, y = data
    with pytest.raises(ValueError, match="Input y contains (NaN|infinity)"):
        TorchModel(make_mlp(n_out=1), task="regression").fit(X, np.array([0, 1, np.nan, 2, 3, 4.0]))
    with pytest.raises(ValueError, match="Input y contains NaN"):
        TorchModel(make_mlp()).fit(X, np.array([0, 1, np.nan, 2, 1, 0]))


def test_diverging_training_names_the_learning_rate(data):
    _, X, y = data
    with pytest.raises(FloatingPointError, match=r"Training loss became (inf|nan).*lower the learning rate"):
        TorchModel(make_mlp(), lr=1e30, epochs=5, batch_size=2).fit(X * 100, y)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("cls", KERNELS)
def test_one_dimensional_X(data, cls):
    model, X, _ = data
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        cls(model).fit(X[:, 0])
    fitted = cls(model).fit(X)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        fitted.transform(X[0])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fitted.transform(torch.as_tensor(X[0]))


def test_one_dimensional_X_to_torchmodel(data):
    model, X, y = data
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        model.predict(X[0])
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        TorchModel(make_mlp()).fit(X[:, 0], y)


@pytest.mark.parametrize("shape", [(6, 4), (6, 5, 1)])
def test_wrongly_shaped_X_at_fit_names_the_first_layer(data, shape):
    from skattr.estimators.hydra import HYDRA

    model, X, y = data
    Xb = np.resize(X, shape)
    for fit in (lambda: TorchModel(make_mlp(), epochs=1).fit(Xb, y),
                lambda: HYDRA(TorchModel(make_mlp(), epochs=1)).fit(Xb, y)):
        with pytest.raises(ValueError, match=rf"X has shape \({shape[0]}, {shape[1]}.* first layer "
                           r"expects inputs whose last dimension is 5 \(layer '0', Linear") as e:
            fit()
        assert isinstance(e.value.__cause__, RuntimeError)  # the original error is kept
    with pytest.raises(ValueError, match=r"X has shape \(6, 5\) .*expects \(n, 2, L\) inputs"):
        TorchModel(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.LazyLinear(3)), epochs=1).fit(X, y)


@pytest.mark.parametrize("cls", KERNELS + [KernelSurrogate])
def test_wrong_number_of_features_at_transform(data, cls):
    model, X, _ = data
    est = KernelSurrogate(TraceNTK(model), "krr") if cls is KernelSurrogate else cls(model)
    est.fit(X)
    method = est.predict if cls is KernelSurrogate else est.transform
    name = "TraceNTK" if cls is KernelSurrogate else cls.__name__
    with pytest.raises(ValueError, match=f"X has 4 features, but {name} is expecting 5 features"):
        method(X[:, :4])


def test_different_trailing_shape_at_transform():
    model = TorchModel(make_cnn(), dtype="float64")
    X = input_for("cnn", 4)
    est = TraceNTK(model).fit(X)
    with pytest.raises(ValueError, match=r"X has trailing shape \(2, 5, 5\) .* fitted with trailing shape \(2, 6, 6\)"):
        est.transform(X[:, :, :5, :5])
    with pytest.raises(ValueError, match=r"trailing shape \(72,\)"):
        est.transform(X.reshape(4, -1))
    fitted = TorchModel(nn.Sequential(nn.Flatten(), nn.Linear(72, 3)), epochs=1).fit(
        X.astype(np.float32), [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"but TorchModel was fitted with trailing shape \(2, 6, 6\)"):
        fitted.predict(X[:, :1].astype(np.float32))


def test_inconsistent_X_and_y(data):
    model, X, y = data
    with pytest.raises(ValueError, match="inconsistent numbers of samples: 6 and 5"):
        TorchModel(make_mlp()).fit(X, y[:5])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        model.per_example_gradients(X, y[:5])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        KernelSurrogate(TraceNTK(model), "krr").fit(X, y[:5])


def test_empty_sparse_and_non_numeric_X(data):
    model, X, _ = data
    with pytest.raises(ValueError, match="0 sample"):
        TraceNTK(model).fit(X[:0])
    with pytest.raises(TypeError, match="Sparse data was passed"):
        TraceNTK(model).fit(sp.csr_matrix(X))
    with pytest.raises(ValueError, match="could not convert string to float"):
        TraceNTK(model).fit([["a"] * 5] * 3)
    with pytest.raises(TypeError, match="Expected X to be an array-like or a torch.Tensor"):
        model.predict(object())


# ----------------------------------------------------------------------------- not fitted
@pytest.mark.parametrize("cls", KERNELS)
def test_unfitted_kernels(data, cls):
    model, X, _ = data
    with pytest.raises(NotFittedError, match=f"This {cls.__name__} instance is not fitted yet"):
        cls(model).transform(X)
    if hasattr(cls, "diagonal"):
        with pytest.raises(NotFittedError):
            cls(model).diagonal(X)
    if hasattr(cls, "feature_map"):
        with pytest.raises(NotFittedError):
            cls(model, projection_dim=8).feature_map(X)


def test_unfitted_surrogate(data):
    model, X, _ = data
    sur = KernelSurrogate(TraceNTK(model))
    for method in (sur.predict, sur.predict_proba, sur.decision_function, sur.explain, sur.score):
        with pytest.raises(NotFittedError, match="This KernelSurrogate instance is not fitted yet"):
            method(X)


# ----------------------------------------------------------------------------- modules
def _frozen():
    net = make_mlp()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("net", [_frozen, lambda: nn.Sequential(nn.Flatten(), nn.Tanh())],
                         ids=["frozen", "parameter-free"])
def test_module_with_no_trainable_parameters(data, net):
    _, X, y = data
    model = TorchModel(net(), dtype="float64")
    msg = "has no trainable parameters"
    with pytest.raises(ValueError, match=msg):
        TraceNTK(model).fit(X)
    with pytest.raises(ValueError, match=msg):
        GradCosKernel(model, projection_dim=8).fit(X, y)
    with pytest.raises(ValueError, match=msg):
        model.per_example_gradients(X)
    with pytest.raises(ValueError, match=msg):
        TorchModel(net(), dtype="float64").fit(X, y)


def test_params_selecting_nothing(data):
    _, X, _ = data
    model = TorchModel(make_mlp(), dtype="float64", params=["head."])
    with pytest.raises(ValueError, match=r"params=\['head.'\] selects no trainable parameter.*'0.weight'"):
        TraceNTK(model).fit(X)


def test_model_that_is_not_a_torchmodel(data):
    _, X, _ = data
    for cls in KERNELS:
        with pytest.raises(ValueError, match=f"'model' parameter of {cls.__name__} must be an instance of"):
            cls(make_mlp()).fit(X)
    with pytest.raises(TypeError, match="kernel must be a skattr kernel transformer"):
        KernelSurrogate("trace").fit(X)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got str"):
        TorchModel("net").fit(X, [0, 1, 2, 0, 1, 2])


def test_bad_torchmodel_settings(data):
    _, X, y = data
    for kw, msg in [
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"task": "clf"}, "task must be 'classification' or 'regression'"),
        ({"lr": -1}, "lr must be a positive finite number"),
        ({"epochs": -1}, "epochs must be a non-negative integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TorchModel(make_mlp(), **kw).fit(X, y)


def test_bad_kernel_settings(data):
    model, X, _ = data
    with pytest.raises(ValueError, match="'projection' parameter of TraceNTK must be a str among"):
        TraceNTK(model, projection="bogus").fit(X)
    with pytest.raises(ValueError, match="'projection_dim' parameter of TraceNTK must be an int"):
        TraceNTK(model, projection_dim=0).fit(X)
    with pytest.raises(ValueError, match="output must be one of"):
        model.per_example_gradients(X, output="bogus")
    with pytest.raises(ValueError, match="feature_map needs projection_dim"):
        TraceNTK(model).fit(X).feature_map(X)
    with pytest.raises(ValueError, match="No submodule named 'nope'"):
        EmbeddingKernel(model, layer="nope").fit(X)
    with pytest.raises(ValueError, match="no nn.Linear layer; pass layer="):
        EmbeddingKernel(TorchModel(nn.Sequential(nn.Conv1d(1, 2, 1)), dtype="float64")).fit(X[:, None])
    with pytest.raises(ValueError, match="estimator must be 'kglm', 'klr', 'svc', 'krr', 'svr'"):
        KernelSurrogate(TraceNTK(model), "bogus").fit(X)
    with pytest.raises(ValueError, match="needs a regressor such as 'krr'"):
        KernelSurrogate(EmpiricalNTK(model), "svc").fit(X)


# ----------------------------------------------------------------------------- memory
def test_projection_too_large_for_memory(data):
    model, X, _ = data
    for cls in (TraceNTK, PseudoNTK, GradCosKernel, EmpiricalNTK):
        with pytest.raises(MemoryError, match=r"projection_dim=1000000000 would need [\d.]+ GiB.*Lower projection_dim"):
            cls(model, projection_dim=10**9).fit(X)


def test_exact_kernel_too_large_for_memory(data, monkeypatch):
    model, X, _ = data
    monkeypatch.setattr(validation, "available_memory", lambda: 2 * 1000)
    with pytest.raises(MemoryError, match=r"Exact gradient factors for 6 samples.*Use projection_dim"):
        TraceNTK(model).fit(X)


# ----------------------------------------------------------------------------- labels
def test_labels_not_among_the_model_classes(data):
    model, X, y = data
    bad = np.array([0, 1, 7, 0, 1, 2])
    msg = r"y contains labels \[7\] that are not among the model's classes \[0, 1, 2\]"
    with pytest.raises(ValueError, match=msg):
        model.per_example_gradients(X, bad)
    with pytest.raises(ValueError, match=msg):
        model.per_example_loss(X, bad)
    with pytest.raises(ValueError, match=msg):
        GradCosKernel(model).fit(X, bad)
    with pytest.raises(ValueError, match=msg):
        KernelSurrogate(EmpiricalNTK(model), "krr").fit(X, bad)
    with pytest.raises(ValueError, match=r"labels \['a'\]"):
        model.per_example_loss(X, np.array(["a"] * 6))
    trained = TorchModel(make_mlp(), epochs=1, random_state=0).fit(X, np.array(list("abcabc")))
    with pytest.raises(ValueError, match=r"y contains labels \['z'\] that are not among the model's classes \['a', 'b', 'c'\]"):
        trained.per_example_loss(X, np.array(list("abcabz")))


def test_continuous_targets_for_a_classifier(data):
    model, X, _ = data
    yc = np.linspace(0, 1, 6)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        TorchModel(make_mlp()).fit(X, yc)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        KernelSurrogate(TraceNTK(model), "krr").fit(X, yc)


def test_single_class_surrogate(data):
    model, X, _ = data
    with pytest.raises(ValueError, match="only one class"):
        KernelSurrogate(TraceNTK(model), "krr").fit(X, np.ones(6, int))


# ----------------------------------------------------------------------------- token ids
V_TOK = 13  # vocabulary of the token networks


class _Tokens(nn.Module):
    """Token ids (n, 4) -> nn.Embedding(13, 3) -> mean -> Linear: the ids go straight in."""

    def __init__(self, convert=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.convert = nn.Embedding(V_TOK, 3), nn.Linear(3, 3), convert

    def forward(self, t):
        return self.head(self.emb(t.long() if self.convert else t).mean(1))


class _Positions(nn.Module):
    """Float features (n, 4) plus a learnt embedding of the positions 0..3 (not of the input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos, self.lin, self.head = nn.Embedding(4, 1), nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.lin(x + self.pos(torch.arange(4, device=x.device))[:, 0]))


def _ids(n=6):
    return np.random.RandomState(0).randint(0, V_TOK, (n, 4))


def test_float_token_ids_name_the_embedding():
    """Fractional floats fed to an nn.Embedding first layer: a ValueError naming the value,
    its place and the layer, from the model's input conversion (before: torch's 'Expected
    tensor for argument #1 indices ... Long, Int' from deep inside the gradient call)."""
    X, y = _ids().astype(np.float64), np.arange(6) % 3
    X[2, 1] += 0.5
    model = TorchModel(_Tokens(), dtype="float64")
    msg = (r"X holds float values \(.*\.5 at X\[2, 1\]\) but the network's first layer 'emb' "
           r"is nn.Embedding\(13, 3\): pass integer token ids")
    for call in (lambda: model.per_example_gradients(X, y), lambda: model.predict(X),
                 lambda: TraceNTK(model).fit(X),
                 lambda: TorchModel(_Tokens(), epochs=1).fit(X, y)):
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("bad", [V_TOK + 3, -1])
def test_out_of_vocabulary_ids_name_the_id_and_place(bad):
    X, y = _ids(), np.arange(6) % 3
    X[4, 2] = bad
    model = TorchModel(_Tokens(), dtype="float64")
    msg = rf"token id {bad} at X\[4, 2\] is out of range for nn.Embedding\(13, 3\).*0 \.\. 12"
    for Xb in (X, torch.as_tensor(X), X.astype(np.float64)):
        with pytest.raises(ValueError, match=msg):
            model.per_example_gradients(Xb, y)
    with pytest.raises(ValueError, match=msg):
        TraceNTK(model).fit(X)


def test_token_ids_in_other_dtypes_are_the_same_ids():
    """Whole-number floats (check_array's float64) and uint8 ids give the int64 ids' gradients;
    a network that converts its input itself, or embeds something else, keeps float input."""
    X, y = _ids(), np.arange(6) % 3
    model = TorchModel(_Tokens(), dtype="float64")
    ref = model.per_example_gradients(X, y)
    for Xb in (X.astype(np.float64), X.astype(np.float32), X.astype(np.uint8),
               torch.as_tensor(X, dtype=torch.float64)):
        np.testing.assert_array_equal(model.per_example_gradients(Xb, y), ref)
    converts = TorchModel(_Tokens(convert=True), dtype="float64")
    assert converts.to_tensor(X.astype(np.float64)).dtype == torch.float64
    np.testing.assert_array_equal(converts.per_example_gradients(X.astype(np.float64), y), ref)
    Xf = np.random.RandomState(1).randn(6, 4)  # fractional features, positions embedded
    pos = TorchModel(_Positions(), dtype="float64")
    assert pos.to_tensor(Xf).dtype == torch.float64 and np.isfinite(pos.predict_proba(Xf)).all()


def test_decomposition_residual_with_projection_dim_says_what_to_do():
    from skattr.estimators import RepresentationTracer

    X = np.random.RandomState(0).randn(16, 5)
    tr = RepresentationTracer(TorchModel(make_mlp(), epochs=1, batch_size=8, momentum=0.0,
                                         dtype="float64", random_state=0),
                              projection_dim=4).fit(X, np.arange(16) % 3)
    with pytest.raises(ValueError, match=r"projection_dim=4.*Refit with projection_dim=None") as e:
        tr.decomposition_residual(X[:2])
    assert "total_update" not in str(e.value)
