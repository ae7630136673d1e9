"""Model-output functions: what an attribution method differentiates.

Separate from the methods (as kronfluence separates ``compute_train_loss`` /
``compute_measurement`` from its algorithms): a :class:`ModelOutput` maps the network's outputs
``z`` (n, C) and encoded targets ``y`` to one scalar per example, and gives the reweighting term
``Q = -d loss / d f`` TRAK multiplies its scores with.

* :class:`MarginOutput` -- the classification margin ``log(p_y / (1 - p_y))`` (TRAK's default);
* :class:`LogitOutput` -- the logit of the label or of a fixed class (or a regression output);
* :class:`LossOutput` -- the model's training loss (TracIn, influence functions, HYDRA);
* :class:`ProbeOutput` -- a frozen linear concept probe on a hidden layer;
* :class:`CallableOutput` -- any callable ``fn(z, y) -> (n,)``.

:func:`make_output` turns an estimator's ``output`` parameter into one of these, and
:func:`output_values` evaluates it (the LDS harness measures the very output that is attributed).
"""

from __future__ import annotations

import copy
import hashlib
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from . import gradients as _grad

__all__ = [
    "ModelOutput",
    "MarginOutput",
    "LogitOutput",
    "LossOutput",
    "CallableOutput",
    "ProbeOutput",
    "make_output",
    "output_values",
]


# ==========================================================================================
# model-output functions
# ==========================================================================================
class ModelOutput:
    """A TRAK model-output function ``f(z; theta)`` and its reweighting term ``Q``.

    Subclasses implement ``__call__(z, y) -> (n,)`` on the network's outputs ``z`` (n, C) and
    encoded targets ``y``, and ``q(z, y) -> (n,)``, the term ``-d loss / d f`` of the training
    loss with respect to the output (``1 - p`` for the classification margin).  ``network(net)``
    may wrap the network so that ``z`` is something else than its logits (e.g. a probe's logit on
    a hidden layer, see :class:`ProbeOutput`); ``prefixes`` then maps the
    model's parameter prefixes to the wrapped module's names.

    ``direction`` is the sign with which a positive attribution moves this output: ``+1``
    (the example raised it), ``-1`` for the loss (the example lowered it).
    """

    direction = 1

    def network(self, net):
        return net

    def prefixes(self, prefixes):
        return prefixes

    def __call__(self, z, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def q(self, z, y):
        return torch.ones(z.shape[0], dtype=z.dtype, device=z.device)

    def check(self, model):
        """Raise if the output does not apply to ``model``."""

    def encode_y(self, model, y, n):
        return model.encode_y(np.asarray(y), n)

    def predict_y(self, model, zs):
        """Encoded targets for samples without labels, from the members' outputs ``zs``."""
        z = zs[0]
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    def describe(self):
        """A JSON-able description (keys feature stores)."""
        return {"type": type(self).__name__}

    def __repr__(self):
        return f"{type(self).__name__}()"


def _class_proba(z, idx):
    """Probability of class ``idx`` (n,) under softmax (sigmoid for a single logit)."""
    if z.shape[1] == 1:
        p1 = torch.sigmoid(z[:, 0])
        return torch.where(idx == 1, p1, 1 - p1)
    return torch.softmax(z, dim=1).gather(1, idx[:, None])[:, 0]


def _predict_classes(zs):
    P = None
    for z in zs:
        p = torch.sigmoid(z) if z.shape[1] == 1 else torch.softmax(z, dim=1)
        P = p if P is None else P + p
    if P.shape[1] == 1:
        return (P[:, 0] > 0.5 * len(zs)).long()
    return P.argmax(1)


class MarginOutput(ModelOutput):
    """Classification margin ``log(p_y / (1 - p_y))`` of the label ``y``; ``Q = 1 - p_y``.

    For a single-logit binary model the margin is ``(2 y - 1) z``.  This is
    ``skattr.gradients.OUTPUTS["margin"]``, TRAK's default.
    """

    def __call__(self, z, y):
        return _grad.OUTPUTS["margin"](z, y, None)[:, 0]

    def q(self, z, y):
        return 1.0 - _class_proba(z, y)

    def check(self, model):
        if model.task != "classification":
            raise ValueError(
                "output='margin' needs a classification model; for regression use output='logit' "
                "(an output column, with Q the residual) or a callable."
            )

    def predict_y(self, model, zs):
        return _predict_classes(zs)

    def describe(self):
        return {"type": "margin"}


class LogitOutput(ModelOutput):
    """The logit of a class: of the label ``y`` (``cls=None``) or of a fixed class ``cls``.

    ``Q = -d loss / d f``: for cross-entropy ``1[y = c] - p_c`` (``1 - p_y`` when ``c = y``); for a
    regression model ``f`` is output column ``cls`` (default 0) and ``Q`` the residual ``y - f``.
    """

    def __init__(self, cls=None):
        self.cls = cls

    def check(self, model):
        if model.task == "classification" and self.cls is not None:
            classes = model.class_labels()
            pos = np.flatnonzero(classes == self.cls)
            if len(pos) != 1:
                raise ValueError(
                    f"output={self.cls!r}: not one of the model's classes {classes.tolist()[:20]}."
                )
            self._cls_index = int(pos[0])
        self._task = model.task

    def __call__(self, z, y):
        if getattr(self, "_task", "classification") == "regression":
            return z[:, 0 if self.cls is None else int(self.cls)]
        idx = y if self.cls is None else torch.full_like(y, self._cls_index)
        if z.shape[1] == 1:
            return torch.where(idx == 1, z[:, 0], -z[:, 0])
        return z.gather(1, idx[:, None])[:, 0]

    def q(self, z, y):
        if getattr(self, "_task", "classification") == "regression":
            c = 0 if self.cls is None else int(self.cls)
            return y.reshape(z.shape[0], -1)[:, c] - z[:, c]
        if self.cls is None:
            return 1.0 - _class_proba(z, y)
        idx = torch.full_like(y, self._cls_index)
        return (y == idx).to(z.dtype) - _class_proba(z, idx)

    def predict_y(self, model, zs):
        if getattr(self, "_task", "classification") == "regression":
            return torch.stack(zs).mean(0)
        return _predict_classes(zs)

    def describe(self):
        return {"type": "logit", "cls": None if self.cls is None else repr(self.cls)}

    def __repr__(self):
        return f"LogitOutput(cls={self.cls!r})"


def task_loss(task, z, y):
    """Per-example training loss (n,) of a ``task`` ("classification" / "regression") model's
    outputs ``z`` (n, C) against encoded targets ``y``: cross-entropy (binary cross-entropy for
    one logit) or half the squared error."""
    if task == "regression":
        return 0.5 * ((z - y.reshape(z.shape)) ** 2).sum(-1)
    if z.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="none")
    return F.cross_entropy(z, y, reduction="none")


class LossOutput(ModelOutput):
    """The model's own per-example training loss ``loss(z, y)`` (:meth:`TorchModel.loss_fn`).

    What TracIn, influence functions and HYDRA differentiate.  ``Q = 1``.  Attribution scores
    built on it are signed so that positive means the training example lowered this loss (it
    helped).
    """

    direction = -1

    def check(self, model):
        self._task = model.task

    def __call__(self, z, y):
        return task_loss(getattr(self, "_task", "classification"), z, y)

    def predict_y(self, model, zs):
        if getattr(self, "_task", "classification") == "regression":
            return torch.stack(zs).mean(0)
        return _predict_classes(zs)

    def describe(self):
        return {"type": "loss"}


class CallableOutput(ModelOutput):
    """Any callable ``fn(z, y) -> (n,)`` of the network's outputs.

    ``Q`` is 1 unless ``fn`` has a ``q(z, y)`` attribute.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, z, y):
        v = self.fn(z, y)
        if v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if v.ndim != 1:
            raise ValueError(
                f"TRAK needs a scalar output per example; the output callable returned shape "
                f"{tuple(v.shape)}."
            )
        return v

    def q(self, z, y):
        if hasattr(self.fn, "q"):
            return self.fn.q(z, y).reshape(-1)
        return super().q(z, y)

    def describe(self):
        fn = self.fn
        return {"type": "callable", "fn": getattr(fn, "__qualname__", type(fn).__qualname__),
                "module": getattr(fn, "__module__", "")}

    def __repr__(self):
        return f"CallableOutput({self.fn!r})"


def make_output(output):
    """The :class:`ModelOutput` for TRAK's ``output`` parameter.

    ``"margin"`` -> :class:`MarginOutput`; ``"logit"`` -> :class:`LogitOutput` of the label;
    ``"loss"`` -> :class:`LossOutput`;
    a class label (int) -> :class:`LogitOutput` of that class; a :class:`ModelOutput` -> a copy
    of it; any other callable -> :class:`CallableOutput`.
    """
    if isinstance(output, ModelOutput):
        return copy.deepcopy(output)
    if isinstance(output, str):
        if output == "margin":
            return MarginOutput()
        if output == "logit":
            return LogitOutput()
        if output == "loss":
            return LossOutput()
        raise ValueError(
            f"output must be 'margin', 'logit', 'loss', a class label or a callable, got {output!r}."
        )
    if isinstance(output, (numbers.Integral, np.integer)) and not isinstance(output, bool):
        return LogitOutput(int(output))
    if callable(output):
        return CallableOutput(output)
    raise TypeError(
        f"output must be 'margin', 'logit', a class label or a callable, got {type(output).__name__}."
    )


@torch.no_grad()
def output_values(model, X, y=None, output="margin", batch_size=None):
    """The model-output function ``f`` of ``model`` on ``(X, y)`` as a numpy array (n,).

    ``y=None`` uses the model's own predictions.  Used by the LDS harness
    (:class:`skattr.metrics.SubsetRetrainer`) so that its targets are the very output TRAK
    attributes.
    """
    out = make_output(output)
    model.prepare(X[:1] if not isinstance(X, torch.Tensor) else X[:1])
    out.check(model)
    Xt = model.to_tensor(X)
    net = out.network(model.network())
    bs = int(batch_size or model.batch_size_eval)
    zs = []
    for i in range(0, Xt.shape[0], bs):
        z = net(Xt[i : i + bs])
        zs.append(z[:, None] if z.ndim == 1 else z)
    z = torch.cat(zs)
    yt = out.predict_y(model, [z]) if y is None else out.encode_y(model, y, Xt.shape[0])
    return out(z, yt).detach().cpu().numpy().astype(np.float64)



# ==========================================================================================
# a frozen concept probe as a model output
# ==========================================================================================
def _concept_labels(c, n):
    c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
    if c.shape[0] != n:
        raise ValueError(f"X and concept have inconsistent numbers of samples: {n} and {c.shape[0]}.")
    if c.ndim != 1:
        raise ValueError(f"concept must be 1-dimensional (one binary label per sample), got {c.shape}.")
    vals = np.unique(c)
    if c.dtype == bool:
        c = c.astype(np.int64)
    elif not np.all(np.isin(vals, [0, 1])):
        raise ValueError(
            f"concept must be binary (0/1 or bool), got values {vals[:10].tolist()}; e.g. pass "
            "np.isin(y, [0, 6, 8, 9])."
        )
    return c.astype(np.int64)


# ==========================================================================================
# probe as a TRAK output
# ==========================================================================================
class _StopForward(Exception):
    pass


class _ProbeNet(torch.nn.Module):
    """The network up to ``layer``, followed by the frozen linear probe: outputs (n, 1) logits."""

    def __init__(self, net, layer, coef, intercept):
        super().__init__()
        self.net = net
        self.layer = layer
        self.register_buffer("coef", coef)
        self.register_buffer("intercept", intercept)

    def forward(self, x):
        mod = self.net.get_submodule(self.layer)
        store = {}

        def hook(m, i, o):
            store["h"] = o
            raise _StopForward

        # registered at call time, after any hook of the gradient engine on the same module, so
        # those run first; raising stops the forward pass at the probed layer.
        h = mod.register_forward_hook(hook)
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            h.remove()
        if "h" not in store:
            raise RuntimeError(f"Layer {self.layer!r} was not called in the forward pass.")
        a = store["h"].flatten(1)
        return (a @ self.coef.to(a.dtype) + self.intercept.to(a.dtype))[:, None]


class ProbeOutput(ModelOutput):
    """A frozen concept probe on layer ``layer`` as a TRAK model-output function.

    The output is the probe's margin ``f = (2c - 1) (w . h(x) + b)`` with ``c`` the concept label
    (TRAK's ``y``), a function of the parameters of the layers below ``layer``; ``Q = 1 -
    sigmoid(f)``, the reweighting term of the probe's logistic loss.  Targets passed to TRAK are
    concept labels (0/1); without labels the probe's own prediction is used.

    Parameters
    ----------
    layer : str
        Module name (``net.named_modules()``) whose output is probed.
    coef : array of shape (d,)
        Probe weights on the flattened activations (standardisation folded in).
    intercept : float
    """

    single_model = True

    def __init__(self, layer, coef, intercept):
        self.layer = layer
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)

    def network(self, net):
        p = next(iter(net.parameters()))
        return _ProbeNet(
            net, self.layer,
            torch.as_tensor(self.coef, dtype=p.dtype, device=p.device),
            torch.as_tensor(self.intercept, dtype=p.dtype, device=p.device),
        ).eval()

    def prefixes(self, prefixes):
        return None if prefixes is None else ["net." + p for p in prefixes]

    def __call__(self, z, y):
        sign = 2.0 * y.to(z.dtype) - 1.0
        return sign * z[:, 0]

    def q(self, z, y):
        return 1.0 - torch.sigmoid(self(z, y))

    def check(self, model):
        mods = dict(model.network().named_modules())
        if self.layer not in mods:
            raise ValueError(f"The probe's layer {self.layer!r} is not a submodule of the model.")

    def encode_y(self, model, y, n):
        return torch.as_tensor(_concept_labels(y, n), device=model.device_)

    def predict_y(self, model, zs):
        return (torch.stack(zs).mean(0)[:, 0] > 0).long()

    def describe(self):
        h = hashlib.blake2b(self.coef.tobytes() + repr(self.intercept).encode(), digest_size=8)
        return {"type": "probe", "layer": self.layer, "coef": h.hexdigest()}

    def __repr__(self):
        return f"ProbeOutput(layer={self.layer!r}, d={self.coef.shape[0]})"
