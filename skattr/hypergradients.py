"""Hypergradients of SGD training with respect to per-example loss weights (HYDRA's recursion).

Training minimises, at step ``t``, the weighted mean-reduced batch loss

    L_t(theta; w) = (1 / |B_t|) sum_{j in B_t} w_j l_j(theta),      (w = 1 in the actual run)

with PyTorch's SGD (dampening 0, no Nesterov, one parameter group)::

    g_t = grad L_t(theta_t) + lambda theta_t;  buf_t = mu buf_{t-1} + g_t;  theta_{t+1} = theta_t - eta_t buf_t.

Differentiating with respect to ``w_i`` gives, for ``d_t = d theta_t / d w_i`` and
``m_t = d buf_t / d w_i`` (``d_0 = 0``, ``m_{-1} = 0``)::

    m_t     = mu m_{t-1} + lambda d_t + H_t d_t + 1[i in B_t] / |B_t| grad l_i(theta_t)
    d_{t+1} = d_t - eta_t m_t

with ``H_t`` the Hessian of ``L_t(.; 1)`` at ``theta_t`` (``hessian="exact"``), its generalised
Gauss-Newton matrix (``"gauss-newton"``) or zero (``"none"``: HYDRA's Hessian-free version).

Without the Hessian the recursion is linear in ``(d, m)`` with *scalar* coefficients: writing the
state after step ``t`` as ``s_t = (d_{t+1}, m_t)``,

    s_t = A_t s_{t-1} + b_t g_{i,t},   A_t = [[1 - eta_t lambda, -eta_t mu], [lambda, mu]],   b_t = (-eta_t, 1),

so ``d_T = sum_t a_t g_{i,t}`` with ``a_t = e_1^T A_{T-1} ... A_{t+1} b_t``
(:func:`lean_coefficients`, one backward pass over the scalars) and ``g_{i,t} = 1[i in B_t] /
|B_t| grad l_i(theta_t)``.  :class:`LazyRecursion` carries ``d_i`` (or ``P d_i``) for every
example and updates only the examples of the batch, applying the product of the ``A``'s of the
steps an example was absent from when it next appears (the authors' lazy scheme, exactly);
:class:`LeanRecursion` accumulates ``-sum_t a_t g_{i,t} . grad l(x, theta_T)`` for fixed targets
``x`` (one scalar per example and target); :class:`DenseRecursion` carries the full vectors with
Hessian- or Gauss-Newton-vector products at every step.

:func:`replay` re-runs a :class:`~skattr.training.TrajectoryRecorder`'s training from its first
checkpoint with the recorded batches and learning rates, checking it against the recorded losses
and checkpoints, and calls a recursion at every step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.optim.sgd import sgd as _sgd_update

from . import gradients as _grad
from .capture import LayerCapture
from .training import Callback

__all__ = [
    "check_followable",
    "check_sgd_optimizer",
    "check_sgd_state",
    "check_batch_weights",
    "check_unweighted",
    "lean_coefficients",
    "step_matrix",
    "BatchCapture",
    "ClosedFormRecursion",
    "LazyRecursion",
    "RecursionHook",
    "LeanRecursion",
    "DenseRecursion",
    "replay",
]

_NOT_SGD = (
    "HYDRA follows torch.optim.SGD only (momentum, weight decay and any learning-rate schedule; "
    "no dampening, no Nesterov, one parameter group); {what}. Adam's hypergradient recursion "
    "(the authors' Adam variant) is not implemented: train with TorchModel (torch.optim.SGD) to "
    "attribute with HYDRA."
)

_WEIGHTED = (
    "HYDRA cannot follow weighted batches: {where} a callback's plan_epoch gave loss weights "
    "(the step's loss sum_j w_j l_j / sum_j w_j, state.batch_weights), but HYDRA's recursion "
    "injects every example of a batch with weight 1/|B_t| (the mean batch loss), so its scores "
    "would not be the derivative of this run. Return unweighted batches (index arrays only) from "
    "plan_epoch to attribute with HYDRA."
)


def uniform_weights(w):
    """True when a step's loss weights leave its loss the mean (``None`` or all equal)."""
    if w is None:
        return True
    w = np.asarray(w)
    return bool(np.all(w == w.flat[0]))


def check_batch_weights(w, step, run="the training"):
    """``ValueError`` if the loss weights ``w`` of step ``step`` are unequal (plan_epoch)."""
    if not uniform_weights(w):
        raise ValueError(_WEIGHTED.format(where=f"at step {step} of {run}"))


def check_unweighted(trajectory):
    """``ValueError`` if a recorded run has a step with unequal loss weights (plan_epoch)."""
    for t, w in enumerate(getattr(trajectory, "batch_weights_", None) or ()):
        check_batch_weights(w, t, "the recorded run")


# ------------------------------------------------------------------------------ checks
def check_sgd_state(state_dict):
    """``(momentum, weight_decay)`` of a recorded ``optimizer.state_dict()``; ``ValueError`` for an
    optimizer the recursion cannot follow (Adam, dampening, Nesterov, several groups)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not groups:
        raise ValueError(_NOT_SGD.format(what="the recorded optimizer state has no parameter group"))
    if len(groups) != 1:
        raise ValueError(_NOT_SGD.format(what=f"the recorded optimizer has {len(groups)} parameter groups"))
    g = groups[0]
    if "betas" in g or "momentum" not in g or "dampening" not in g:
        kind = "Adam-like (betas)" if "betas" in g else "not SGD"
        raise ValueError(_NOT_SGD.format(what=f"the recorded optimizer is {kind}: keys {sorted(g)}"))
    if float(g.get("dampening", 0.0)) != 0.0:
        raise ValueError(_NOT_SGD.format(what=f"dampening={g['dampening']}"))
    if g.get("nesterov", False):
        raise ValueError(_NOT_SGD.format(what="nesterov=True"))
    if g.get("maximize", False):
        raise ValueError(_NOT_SGD.format(what="maximize=True"))
    return float(g["momentum"]), float(g["weight_decay"])


def check_sgd_optimizer(opt):
    """As :func:`check_sgd_state` for a live optimizer."""
    if not isinstance(opt, torch.optim.SGD):
        raise ValueError(_NOT_SGD.format(what=f"the optimizer is {type(opt).__name__}"))
    return check_sgd_state(opt.state_dict())


def check_followable(net):
    """``ValueError`` for layers that couple the examples of a batch or are random in training
    (BatchNorm, Dropout with p > 0): the per-example weights' hypergradient assumes neither.
    ``Dropout(p=0)`` is the identity and accepted."""
    drop = (torch.nn.modules.dropout._DropoutNd, torch.nn.AlphaDropout)
    bad = [type(m).__name__ if not isinstance(m, drop) else f"{type(m).__name__}(p={m.p})"
           for m in net.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           or (isinstance(m, drop) and float(m.p) != 0.0)]
    if bad:
        raise ValueError(
            f"HYDRA cannot follow a network with {sorted(set(bad))} layers: in training they couple "
            "the examples of a batch (batch statistics) or are random (dropout), so the per-example "
            "loss weights' hypergradient is not the recursion HYDRA carries. Use a network without them "
            "(Dropout(p=0), the identity, is accepted)."
        )


# ------------------------------------------------------------------------------ scalars
def step_matrix(lr, momentum, weight_decay):
    """``A_t`` (4 floats, row-major) and ``b_t`` (2 floats) of one Hessian-free step on ``(d, m)``."""
    return (1.0 - lr * weight_decay, -lr * momentum, weight_decay, momentum), (-lr, 1.0)


def lean_coefficients(lrs, momentum, weight_decay):
    """``a_t`` (T,) with ``d_T = sum_t a_t g_t`` for gradients ``g_t`` injected into the momentum
    buffer at step ``t`` (the Hessian-free recursion).  With ``momentum = weight_decay = 0``,
    ``a_t = -eta_t``."""
    T = len(lrs)
    a = np.empty(T, dtype=np.float64)
    r0, r1 = 1.0, 0.0  # row vector e_1^T A_{T-1} ... A_{t+1}
    for t in range(T - 1, -1, -1):
        (a11, a12, a21, a22), (b0, b1) = step_matrix(float(lrs[t]), momentum, weight_decay)
        a[t] = r0 * b0 + r1 * b1
        r0, r1 = r0 * a11 + r1 * a21, r0 * a12 + r1 * a22
    return a


# ------------------------------------------------------------------------------ gradients
class GradientSource:
    """Per-example loss gradients of a model's network, flat or projected (``P g / sqrt(k)``)."""

    def __init__(self, model, output, projector=None, method="auto"):
        self.model, self.output, self.projector, self.method = model, output, projector, method
        self.prefixes = output.prefixes(model.prefixes_)

    def records(self, net, xb, yb):
        was = net.training
        net.eval()
        try:
            return _grad.compute_records(net, xb, output=self.output, y=yb, loss=self.model.loss_fn,
                                         prefixes=self.prefixes, method=self.method)
        finally:
            net.train(was)

    def features(self, net, xb, yb):
        """(n, k) float64."""
        recs = self.records(net, xb, yb)
        return self.project(recs)

    def project(self, recs):
        P = self.projector
        if P is None:
            return _grad.flatten(recs)[:, 0].to(torch.float64)
        n = _grad.records_shape(recs)[0]
        out = torch.zeros(n, 1, P.k, dtype=P.dtype, device=P.device)
        _grad.project(recs, P, out=out)
        return out[:, 0].to(torch.float64) / math.sqrt(P.k)


def take_records(recs, rows):
    """Rows ``rows`` of a list of gradient records."""
    out = []
    for r in recs:
        if isinstance(r, _grad.KronRecord):
            out.append(_grad.KronRecord(r.key, r.x[rows], r.d[rows], r.bias))
        else:
            out.append(_grad.DenseRecord(r.key, r.g[rows]))
    return out


def cat_records(parts):
    """Concatenate lists of gradient records along the examples."""
    out = []
    for rs in zip(*parts):
        r = rs[0]
        if isinstance(r, _grad.KronRecord):
            out.append(_grad.KronRecord(r.key, torch.cat([q.x for q in rs]), torch.cat([q.d for q in rs]), r.bias))
        else:
            out.append(_grad.DenseRecord(r.key, torch.cat([q.g for q in rs])))
    return out


def row_dots(ra, rb):
    """``grad_a[j] . grad_b[j]`` for paired rows of two record lists, (n,)."""
    tot = None
    for a, b in zip(ra, rb):
        if isinstance(a, _grad.KronRecord) and a.L == 1:
            term = (a.a[:, 0] * b.a[:, 0]).sum(-1) * (a.d[:, 0] * b.d[:, 0]).sum((-1, -2))
        else:
            term = (a.dense() * b.dense()).sum((-1, -2))
        tot = term if tot is None else tot + term
    return tot


# ------------------------------------------------------------------------------ batch capture
class BatchCapture:
    """Per-example loss gradients of a training step from the step's own forward and backward
    pass (no second pass): a :class:`~skattr.capture.LayerCapture` keeps each layer's input and
    output gradient.  With the batch loss ``(1/|B|) sum_j l_j`` the output gradient of row ``j`` is
    ``(1/|B|) dl_j/dz_j``, so the records built from it are ``g_{j,t} = grad l_j / |B|``: the
    recursion's injection as is.

    ``ok`` is False (and the caller computes the records in a separate pass) when the network
    has layers the structured records do not cover, tied parameters, in-place operations or a
    layer called more than once.
    """

    def __init__(self, net, prefixes, x_probe):
        self.specs = _grad.selected_modules(net, prefixes)
        self.capture = LayerCapture({n: mod for n, (mod, _) in self.specs.items()})
        unsupported = _grad.structured_support(net, prefixes)
        if unsupported is not None:
            self.reason = f"the structured records do not cover it ({unsupported})"
        elif _grad.has_tied_parameters(self.specs):
            self.reason = "it has tied (shared) parameters"
        elif any(getattr(m, "inplace", False) for m in net.modules()):
            self.reason = "it has in-place operations (inplace=True)"
        else:
            self.reason = None
        self.ok = self.reason is None
        if self.ok:  # every selected layer called exactly once per forward
            self.capture.install().begin()
            with torch.no_grad():
                net(x_probe)
            self.ok = all(len(c) == 1 for c in self.capture.end().values())
            if not self.ok:
                self.reason = "a layer is called more than once per forward pass"
                self.remove()

    def remove(self):
        self.capture.remove()

    def begin(self):
        self.capture.begin()

    def records(self, pos):
        """Records of batch rows ``pos`` (``grad l_j / |B|``), or None if the pass did not
        capture them cleanly."""
        calls = self.capture.end()
        recs = []
        for name, (mod, pnames) in self.specs.items():
            c = calls[name]
            if len(c) != 1 or c[0].grad is None or c[0].input_modified:
                return None
            inp, g = c[0].input, c[0].grad
            if len(pos) != inp.shape[0]:  # only the tracked rows (all rows: no copy)
                inp, g = inp[pos], g[pos]
            recs.extend(_grad.layer_records(name, mod, pnames, inp, g[:, None]))
        return recs


# ------------------------------------------------------------------------------ recursions
class ClosedFormRecursion:
    """Hessian-free ``d_i = sum_{t: i in B_t} a_t g_{i,t}`` (or ``P d_i``) for the tracked
    examples, the coefficients ``a_t`` known in advance (:func:`lean_coefficients`): each step
    adds to the rows of the batch only."""

    uses_records = True
    flush_rows = 512  # examples buffered before one projection (larger products, less overhead)
    flat_block = 1 << 22  # full vectors: products per row block of a flush

    def __init__(self, source, tracked, n_train, coefficients, dim, device):
        self.source = source
        self.tracked = np.asarray(tracked)
        self.pos = np.full(n_train, -1, dtype=np.int64)
        self.pos[self.tracked] = np.arange(len(self.tracked))
        self.a = np.asarray(coefficients, dtype=np.float64)
        self.D = torch.zeros(len(self.tracked), dim, dtype=torch.float64, device=device)
        self._buf, self._n = [], 0
        self._fixed = None
        self._flat = None  # full vectors: reused product buffers (float32 / float64) and rows per block

    def add(self, t, rows, recs, lr):
        if not len(rows):
            return
        a = float(self.a[t])
        if self._fixed is None:
            # Linear layers: rows written into buffers reused for the whole run, the inputs'
            # ones column (the bias) filled once, ``a_t`` folded into the copy
            self._fixed = all(isinstance(r, _grad.KronRecord) and r.L == 1 for r in recs)
            if self._fixed:
                cap = self.flush_rows + len(rows)
                self._rows = torch.empty(cap, dtype=torch.int64, device=self.D.device)
                self._recs = []
                for r in recs:
                    xb = r.x.new_empty((cap, 1, r.x.shape[-1] + int(bool(r.bias))))
                    if r.bias:
                        xb[..., -1] = 1.0
                    db = r.d.new_empty((cap,) + tuple(r.d.shape[1:]))
                    self._recs.append((r.key, xb, db))
        if not self._fixed:
            scaled = [_grad.KronRecord(r.key, r.x, r.d * a, r.bias) if isinstance(r, _grad.KronRecord)
                      else _grad.DenseRecord(r.key, r.g * a) for r in recs]
            self._buf.append((np.asarray(rows), scaled))
            self._n += len(rows)
            if self._n >= self.flush_rows:
                self._flush()
            return
        n0 = self._n
        if n0 + len(rows) > self._rows.shape[0]:
            self._flush()
            n0 = 0
        n1 = n0 + len(rows)
        self._rows[n0:n1] = torch.as_tensor(rows)
        for r, (_, xb, db) in zip(recs, self._recs):
            xb[n0:n1, :, : r.x.shape[-1]] = r.x
            torch.mul(r.d, a, out=db[n0:n1])
        self._n = n1
        if n1 >= self.flush_rows:
            self._flush()

    def _flush(self):
        if self._fixed:
            n, self._n = self._n, 0
            flat = self.source.projector is None and all(db.shape[2] == 1 for _, _, db in self._recs)
            if n and flat:
                self._flush_flat(n)
            elif n:
                recs = [_grad.KronRecord(key, xb[:n], db[:n], False) for key, xb, db in self._recs]
                self.D.index_add_(0, self._rows[:n], self.source.project(recs))
            return
        if not self._buf:
            return
        rows = np.concatenate([r for r, _ in self._buf])
        recs = self._buf[0][1] if len(self._buf) == 1 else cat_records([c for _, c in self._buf])
        g = self.source.project(recs)
        self.D.index_add_(0, torch.as_tensor(rows, device=self.D.device), g)
        self._buf, self._n = [], 0

    def _flush_flat(self, n):
        """Full vectors: each layer's outer products ``d x^T`` (and bias ``d``) added straight
        into its columns of ``D`` (the values of ``source.project`` without forming the
        gradient matrix, reordering it into parameter order, concatenating the layers and
        converting the whole to float64: the same products and sums, bit for bit)."""
        layers = []
        for key, xb, db in self._recs:
            bias = key.endswith("+bias")
            # d (a_t folded in), x without the ones column
            layers.append((db[:, 0, 0], xb[:, 0, :-1] if bias else xb[:, 0], bias))
        kmax = max(d.shape[1] * x.shape[1] for d, x, _ in layers)
        if self._flat is None:
            # row blocks of at most flat_block products, in buffers reused for the whole run (fresh
            # allocations of the whole flush's gradients spent their time in page faults)
            rb = max(1, min(self._rows.shape[0], self.flat_block // kmax))
            self._flat = (torch.empty(rb * kmax, dtype=layers[0][0].dtype, device=self.D.device),
                          torch.empty(rb * kmax, dtype=torch.float64, device=self.D.device), rb)
        g32, g64, rb = self._flat
        for r0 in range(0, n, rb):
            r1 = min(n, r0 + rb)
            rows, m, off = self._rows[r0:r1], r1 - r0, 0
            for d, x, bias in layers:
                d, x = d[r0:r1], x[r0:r1]
                k = d.shape[1] * x.shape[1]
                g = g32[: m * k].view(m, d.shape[1], x.shape[1])
                torch.mul(d[:, :, None], x[:, None, :], out=g)
                g = g64[: m * k].view(m, k).copy_(g.view(m, k))
                self.D[:, off : off + k].index_add_(0, rows, g)
                off += k
                if bias:  # the ones column's products: d itself
                    self.D[:, off : off + d.shape[1]].index_add_(0, rows, d.to(torch.float64))
                    off += d.shape[1]

    def finish(self):
        self._flush()
        return self.D


class LazyRecursion:
    """Hessian-free ``(d_i, m_i)`` (or their projections) for the tracked examples, updated only
    when an example is in the batch; the steps it was absent from are applied then, exactly, as
    the product of their 2x2 scalar step matrices (the authors' lazy scheme; needs no knowledge
    of future learning rates).  ``add`` must be called at every step (``rows`` may be empty)."""

    uses_records = True

    def __init__(self, source, tracked, n_train, momentum, weight_decay, dim, device):
        self.source = source
        self.tracked = np.asarray(tracked)
        self.pos = np.full(n_train, -1, dtype=np.int64)
        self.pos[self.tracked] = np.arange(len(self.tracked))
        self.mu, self.wd = float(momentum), float(weight_decay)
        self.S = torch.zeros(len(self.tracked), 2, dim, dtype=torch.float64, device=device)
        self.last = np.full(len(self.tracked), -1, dtype=np.int64)
        self.A = []  # step matrices of every step so far
        self.t = 0

    def _catch_up(self, rows, t):
        """Apply ``A_{t-1} ... A_{last+1}`` to the rows (examples absent since their last step)."""
        last = self.last[rows]
        seen = last >= 0
        if not np.any(seen & (last < t - 1)):
            return
        lo = int(last[seen].min()) + 1
        prods = {}
        p = (1.0, 0.0, 0.0, 1.0)
        for s in range(t - 1, lo - 1, -1):  # p = A_{t-1} ... A_s
            a = self.A[s]
            p = (p[0] * a[0] + p[1] * a[2], p[0] * a[1] + p[1] * a[3],
                 p[2] * a[0] + p[3] * a[2], p[2] * a[1] + p[3] * a[3])
            prods[s] = p
        ident = (1.0, 0.0, 0.0, 1.0)
        phi = torch.tensor([prods.get(int(s) + 1, ident) if ok else ident for s, ok in zip(last, seen)],
                           dtype=torch.float64, device=self.S.device).view(-1, 2, 2)
        rt = torch.as_tensor(rows, device=self.S.device)
        self.S[rt] = torch.einsum("nij,njk->nik", phi, self.S[rt])

    def add(self, t, rows, recs, lr):
        Amat, b = step_matrix(float(lr), self.mu, self.wd)
        self.A.append(Amat)
        if len(rows):
            g = self.source.project(recs)
            self._catch_up(rows, t)
            rt = torch.as_tensor(rows, device=self.S.device)
            d, m = self.S[rt, 0], self.S[rt, 1]
            self.S[rt, 0] = Amat[0] * d + Amat[1] * m + b[0] * g
            self.S[rt, 1] = Amat[2] * d + Amat[3] * m + b[1] * g
            self.last[rows] = t
        self.t = t + 1

    def finish(self):
        """``d_i`` after the last step, (n_tracked, dim) float64."""
        self._catch_up(np.arange(len(self.tracked)), self.t)
        self.last[self.last >= 0] = self.t - 1
        return self.S[:, 0]


class LeanRecursion:
    """``-grad l(x, theta_T) . d_i`` for fixed targets, accumulated over a replay from the
    Hessian-free closed form ``d_i = sum_t a_t g_{i,t}`` (one scalar per example and target),
    and ``-grad l_i(theta_T) . d_i`` (self-influence) from records of ``grad l_i(theta_T)``.

    When every record is a one-position Kronecker record (Linear layers), each step's rows are
    written into buffers reused for the whole replay (``-a_t`` folded into the output factor as
    they are copied) and contracted ``flush_rows`` at a time; a bias enters as ``x . x' + 1``
    instead of a ones column appended to the inputs.  Other records are buffered as lists and
    contracted with :func:`skattr.gradients.gram`.

    With ``reduction="mean"`` the targets are one objective, the mean of their losses: the
    recursion being linear, one score per example against the mean target gradient
    (:class:`_MeanTarget`), contracted at the same flushes."""

    uses_records = True
    flush_rows = 512

    def __init__(self, source, tracked, n_train, coefficients, target_records, self_records=None,
                 reduction="none"):
        self.source = source
        self.tracked = np.asarray(tracked)
        self.pos = np.full(n_train, -1, dtype=np.int64)
        self.pos[self.tracked] = np.arange(len(self.tracked))
        self.a = np.asarray(coefficients, dtype=np.float64)
        self.rx = target_records
        self.rself = self_records
        n_t = _grad.records_shape(target_records)[0] if target_records is not None else 0
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}.")
        self.mean = None
        if reduction == "mean" and target_records is not None:
            self.mean, n_t = [_MeanTarget(r) for r in target_records], 1
        dev = source.model.device_
        self.scores_t = torch.zeros(len(self.tracked), n_t, dtype=torch.float64, device=dev)
        self.self_scores = torch.zeros(len(self.tracked), dtype=torch.float64, device=dev)
        self._buf, self._n = [], 0
        self._fixed = None  # the reused buffers of the Kronecker path, made at the first step

    @property
    def scores(self):
        """(n_targets, n_tracked)."""
        self.flush()
        return self.scores_t.T

    @staticmethod
    def _kron1(recs):
        return recs is None or all(isinstance(r, _grad.KronRecord) and r.L == 1 for r in recs)

    def add(self, t, rows, recs, lr):
        if not len(rows):
            return
        c = -float(self.a[t])
        if self._fixed is None:
            self._fixed = self._kron1(recs) and self._kron1(self.rself) and (
                self.mean is not None or self._kron1(self.rx))
            if self._fixed:
                cap = self.flush_rows + len(rows)
                self._rows = torch.empty(cap, dtype=torch.int64, device=self.scores_t.device)
                self._xb = [r.x.new_empty((cap,) + tuple(r.x.shape[2:])) for r in recs]
                self._db = [r.d.new_empty((cap,) + tuple(r.d.shape[2:])) for r in recs]
                self._bias = [bool(r.bias) for r in recs]
        if not self._fixed:
            scaled = [_grad.KronRecord(r.key, r.x, r.d * c, r.bias) if isinstance(r, _grad.KronRecord)
                      else _grad.DenseRecord(r.key, r.g * c) for r in recs]
            self._buf.append((np.asarray(rows), scaled))
            self._n += len(rows)
            if self._n >= self.flush_rows:
                self.flush()
            return
        n0 = self._n
        if n0 + len(rows) > self._rows.shape[0]:
            self.flush()
            n0 = 0
        n1 = n0 + len(rows)
        self._rows[n0:n1] = torch.as_tensor(rows)
        for r, xb, db in zip(recs, self._xb, self._db):
            xb[n0:n1] = r.x[:, 0]
            torch.mul(r.d[:, 0], c, out=db[n0:n1])
        self._n = n1
        if n1 >= self.flush_rows:
            self.flush()

    def flush(self):
        if self._fixed:
            self._flush_fixed()
            return
        if not self._buf:
            return
        rows = np.concatenate([r for r, _ in self._buf])
        recs = self._buf[0][1] if len(self._buf) == 1 else cat_records([c for _, c in self._buf])
        self._buf, self._n = [], 0
        rt = torch.as_tensor(rows, device=self.scores_t.device)
        if self.mean is not None:
            K = sum(m.dots(r) for r, m in zip(recs, self.mean))
            self.scores_t[:, 0].index_add_(0, rt, K.to(torch.float64))
        elif self.rx is not None:
            self.scores_t.index_add_(0, rt, _grad.gram(recs, self.rx).to(torch.float64))
        if self.rself is not None:
            self.self_scores.index_add_(0, rt, row_dots(take_records(self.rself, rt), recs).to(torch.float64))

    def _flush_fixed(self):
        n = self._n
        if not n:
            return
        self._n = 0
        rt = self._rows[:n]
        K = S = None
        for j, (xb, db, bias) in enumerate(zip(self._xb, self._db, self._bias)):
            x, d = xb[:n], db[:n].flatten(1)
            if self.mean is not None:
                term = self.mean[j].dots_xd(x, d, bias)
                K = term if K is None else K.add_(term)
            elif self.rx is not None:
                tx = self.rx[j]
                term = x @ tx.x[:, 0].T
                if bias:
                    term += 1.0
                term *= d @ tx.d[:, 0].flatten(1).T
                K = term if K is None else K.add_(term)
            if self.rself is not None:
                sx = self.rself[j]
                xs = sx.x[:, 0].index_select(0, rt)
                ds = sx.d[:, 0].flatten(1).index_select(0, rt)
                term = (x * xs).sum(1)
                if bias:
                    term += 1.0
                term *= (d * ds).sum(1)
                S = term if S is None else S.add_(term)
        if K is not None:
            if K.ndim == 1:
                K = K[:, None]
            self.scores_t.index_add_(0, rt, K.to(torch.float64))
        if S is not None:
            self.self_scores.index_add_(0, rt, S.to(torch.float64))


class _MeanTarget:
    """The mean over targets of one layer's gradient record, and its dot product with each row
    of a training record.  A Linear layer's mean keeps whichever form costs fewer multiply-adds
    per training row: the dense ``(m d_out, d_in)`` matrix ``mean_j d_j a_j^T`` (``d_out d_in``)
    or the targets' factors, averaged after the product (``n_targets (d_out + d_in)``).  Other
    records: the mean of the formed gradients."""

    def __init__(self, rec):
        self.kind = "formed"
        if isinstance(rec, _grad.KronRecord) and rec.L == 1:
            dt, n_t = rec.d[:, 0].flatten(1), rec.d.shape[0]
            self.bias = bool(rec.bias)
            if dt.shape[1] * rec.d_in <= n_t * (dt.shape[1] + rec.d_in):
                self.kind, self.G = "matrix", dt.T @ rec.a[:, 0] / n_t  # (m d_out, d_in [+1])
            else:
                self.kind, self.x, self.d = "factors", rec.x[:, 0], dt
        else:
            self.g = rec.dense().flatten(1).mean(0)

    def dots(self, r):
        """``grad_i . mean_j grad_j`` for every row ``i`` of record ``r``, (n,)."""
        if self.kind == "formed" or not (isinstance(r, _grad.KronRecord) and r.L == 1):
            g = self.g if self.kind == "formed" else self._formed()
            return r.dense().flatten(1) @ g
        return self.dots_xd(r.x[:, 0], r.d[:, 0].flatten(1), bool(r.bias))

    def dots_xd(self, x, d, bias):
        """:meth:`dots` of the Linear-layer rows ``d_i a_i^T`` given as inputs ``x`` (n, d_in,
        without the bias column) and output factors ``d`` (n, m d_out)."""
        if self.kind == "matrix":
            u = d @ self.G
            out = (u[:, : x.shape[1]] * x).sum(1)
            return out.add_(u[:, -1]) if bias else out
        K = x @ self.x.T
        if bias:
            K += 1.0
        return K.mul_(d @ self.d.T).mean(1)

    def _formed(self):
        if self.kind == "matrix":
            return self.G.reshape(-1)
        g = self.d.T @ self.x / self.x.shape[0]
        if self.bias:
            g = torch.cat([g, self.d.mean(0)[:, None]], 1)
        return g.reshape(-1)


class DenseRecursion:
    """``(d_i, m_i)`` for every tracked example as full parameter vectors, with Hessian-vector
    (``"exact"``) or Gauss-Newton-vector (``"gauss-newton"``) products of the batch loss at every
    step (or none).  Runs before the step's update (:meth:`step`, at ``theta_t``)."""

    uses_records = False

    def __init__(self, source, tracked, n_train, momentum, weight_decay, net, hessian, chunk=64):
        self.source = source
        self.tracked = np.asarray(tracked)
        self.pos = np.full(n_train, -1, dtype=np.int64)
        self.pos[self.tracked] = np.arange(len(self.tracked))
        self.mu, self.wd = float(momentum), float(weight_decay)
        self.hessian, self.chunk = hessian, int(chunk)
        self.names = [n for n, p in net.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in net.named_parameters() if p.requires_grad]
        p = sum(int(np.prod(s)) for s in self.shapes)
        dev = next(net.parameters()).device
        self.D = torch.zeros(len(self.tracked), p, dtype=torch.float64, device=dev)
        self.M = torch.zeros_like(self.D)

    def _unflat(self, theta):
        out, c = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s))
            out[n] = theta[c : c + k].view(s)
            c += k
        return out

    def _curvature(self, net, xb, yb, V):
        params = dict(net.named_parameters())
        dtype = params[self.names[0]].dtype
        theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        loss_fn = self.source.model.loss_fn

        def f(th):
            z = functional_call(net, self._unflat(th), (xb,))
            return z[:, None] if z.ndim == 1 else z

        def lz(z):
            return loss_fn(z, yb).mean()

        if self.hessian == "exact":
            g = grad(lambda th: lz(f(th)))

            def prod(v):
                return jvp(g, (theta,), (v,))[1]
        else:
            z0, vjp_fn = vjp(f, theta)
            gz = grad(lz)

            def prod(v):
                Jv = jvp(f, (theta,), (v,))[1]
                return vjp_fn(jvp(gz, (z0,), (Jv,))[1])[0]

        out = torch.empty_like(V)
        was = net.training
        net.eval()
        try:
            for i in range(0, V.shape[0], self.chunk):
                out[i : i + self.chunk] = vmap(prod)(V[i : i + self.chunk].to(dtype)).to(torch.float64)
        finally:
            net.train(was)
        return out

    def step(self, net, Xt, yt, idx, lr):
        idx = np.asarray(idx)
        it = torch.as_tensor(idx, device=Xt.device)
        M = self.mu * self.M + self.wd * self.D
        if self.hessian != "none":
            M += self._curvature(net, Xt[it], yt[it], self.D)
        rows = self.pos[idx]
        keep = rows >= 0
        if np.any(keep):
            st = torch.as_tensor(idx[keep], device=Xt.device)
            g = self.source.features(net, Xt[st], yt[st]) / len(idx)
            M[torch.as_tensor(rows[keep], device=M.device)] += g
        self.M = M
        self.D = self.D - float(lr) * M

    def finish(self):
        return self.D


FUSED = True  # per-example gradients from the training step's own pass where possible


class RecursionHook(Callback):
    """Drives a recursion through training steps: :meth:`on_batch_begin` at ``theta_t`` (before
    the forward pass), :meth:`on_batch_end` after the backward pass (the per-example gradients
    come from that pass through :class:`BatchCapture` when it can, else from a separate pass at
    ``on_batch_begin``).  A :class:`~skattr.training.Callback` of ``TorchModel.fit`` or called by
    :func:`replay`."""

    def __init__(self, recursion, source, Xt, yt, net, lrs=None, fused=None):
        self.recursion, self.source, self.Xt, self.yt = recursion, source, Xt, yt
        self.lrs = lrs
        self.capture = None
        if not recursion.uses_records:
            self.engine = {"engine": "curvature", "reason": "hessian='exact' / 'gauss-newton': "
                           "every tracked example's full vector, with torch.func products each step"}
        elif not (FUSED if fused is None else fused):
            self.engine = {"engine": "separate pass", "reason": "fused=False"}
        else:
            cap = BatchCapture(net, source.prefixes, Xt[:2])
            self.capture = cap if cap.ok else None
            self.engine = (
                {"engine": "step capture", "reason": "per-example gradients read off the training "
                 "step's own forward and backward pass"} if cap.ok else
                {"engine": "separate pass", "reason": "per-example gradients of the step's batch "
                 f"in a second pass: the step's own pass cannot give them, {cap.reason}"})
        self.t = 0
        self.n_fallback = 0

    def on_train_begin(self, state=None):
        pass

    def on_batch_begin(self, state):
        net, idx, lr = state.module, np.asarray(state.batch_indices), float(state.lr)
        t = self.t
        if self.lrs is not None and not math.isclose(lr, float(self.lrs[t]), rel_tol=1e-9, abs_tol=1e-15):
            raise RuntimeError(
                f"The learning rate of step {t} is {lr}, not the {self.lrs[t]} HYDRA's coefficients "
                "assumed from the model's schedule."
            )
        self.idx, self.lr = idx, lr
        rows = self.recursion.pos[idx]
        self.keep = np.flatnonzero(rows >= 0)
        self.rows = rows[self.keep]
        if not self.recursion.uses_records:
            self.recursion.step(net, self.Xt, self.yt, idx, lr)
            return
        self.recs = None
        if len(self.rows) and self.capture is None:
            st = torch.as_tensor(idx[self.keep], device=self.Xt.device)
            self.recs = self._scaled(self.source.records(net, self.Xt[st], self.yt[st]), len(idx))
        if self.capture is not None:
            self.capture.begin()

    @staticmethod
    def _scaled(recs, B):
        out = []
        for r in recs:
            if isinstance(r, _grad.KronRecord):
                out.append(_grad.KronRecord(r.key, r.x, r.d / B, r.bias))
            else:
                out.append(_grad.DenseRecord(r.key, r.g / B))
        return out

    def on_batch_end(self, state=None):
        t = self.t
        self.t += 1
        if not self.recursion.uses_records:
            return
        recs = self.recs
        if self.capture is not None:
            recs = self.capture.records(self.keep) if len(self.rows) else None
            if recs is None and len(self.rows):
                raise RuntimeError(
                    "HYDRA could not capture the per-example gradients of the training step "
                    f"(step {t}): a layer was not called exactly once or its input changed in place."
                )
        self.recursion.add(t, self.rows, recs, self.lr)

    def on_epoch_end(self, state=None):
        pass

    def on_train_end(self, state=None):
        if self.capture is not None:
            self.capture.remove()

    def __deepcopy__(self, memo):  # TorchModel.fit copies its callbacks
        return self


# ------------------------------------------------------------------------------ replay
class _Step:
    def __init__(self, module, batch_indices, lr):
        self.module, self.batch_indices, self.lr = module, batch_indices, lr


def _rel_diff(a, b):
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def _sgd_step(params, bufs, lr, kw):
    """``torch.optim.SGD.step`` for parameters ``params`` with momentum buffers ``bufs``
    (updated in place); parameters without a gradient are skipped, as the optimizer does."""
    sel = [i for i, p in enumerate(params) if p.grad is not None]
    ps = params if len(sel) == len(params) else [params[i] for i in sel]
    bs = bufs if len(sel) == len(params) else [bufs[i] for i in sel]
    with torch.no_grad():
        _sgd_update(ps, [p.grad for p in ps], bs, lr=lr, **kw)
    if bs is not bufs:
        for j, i in enumerate(sel):
            bufs[i] = bs[j]


def replay(model, trajectory, Xt, yt, hook=None, *, check=True, rtol=1e-4, verbose=0):
    """Re-run ``trajectory``'s training on ``model``'s network (fitted TorchModel whose network
    is set to the first checkpoint by this function), calling ``hook.on_batch_begin`` before
    every step's forward pass and ``hook.on_batch_end`` after its backward pass (before the
    update).

    The replay is checked against the recording: every step's mini-batch loss against
    ``trajectory.losses_`` and the parameters against every recorded checkpoint (relative
    tolerance ``rtol``); a mismatch means the data or the architecture differ from the
    recording (``ValueError``).  A non-finite loss raises ``FloatingPointError``.
    """
    check_unweighted(trajectory)
    net = model.module_
    ck0 = trajectory.checkpoints_[0][1]
    try:
        net.load_state_dict(ck0)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise ValueError(
            "The trajectory's network differs from the model's (a different architecture): "
            f"{lines[0]} {lines[1:3]}"
        ) from None
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=float(trajectory.lrs_[0]), momentum=trajectory.momentum_,
                          weight_decay=trajectory.weight_decay_)
    try:
        opt.load_state_dict(trajectory.optimizer_states_[0])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"The trajectory's optimizer state does not fit the model's network: {exc}") from None
    # the optimizer's own update function, called without its per-step wrapper; the buffers are
    # copies (a loaded state can share the recording's tensors)
    group = opt.param_groups[0]
    sgd_kw = {k: group[k] for k in ("weight_decay", "momentum", "dampening", "nesterov", "maximize")}
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    bufs = [None if b is None else b.detach().clone() for b in bufs]
    if group.get("foreach") is None and group.get("fused") is None and all(p.device.type == "cpu" for p in params):
        # the multi-tensor update applies the same per-tensor operations on the CPU, with
        # less per-parameter overhead (checked bit-identical against the recorded training)
        sgd_kw["foreach"] = True
    del opt
    checkpoints = {int(s): sd for s, sd in trajectory.checkpoints_[1:]}
    T = len(trajectory.batches_)
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc="HYDRA: replay", leave=False)
    for t in range(T):
        idx = np.asarray(trajectory.batches_[t])
        lr = float(trajectory.lrs_[t])
        it = torch.as_tensor(idx, device=Xt.device)
        if hook is not None:
            hook.on_batch_begin(_Step(net, idx, lr))
        out = net(Xt[it])
        if out.ndim == 1:
            out = out[:, None]
        loss = model.loss_fn(out, yt[it]).mean()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(
                f"The replayed training loss became {lv} at step {t}: the run diverged "
                "(lower the learning rate)."
            )
        if check and t < len(trajectory.losses_):
            rec = float(trajectory.losses_[t])
            if not math.isclose(lv, rec, rel_tol=max(rtol, 1e-6) * 10, abs_tol=1e-6):
                raise ValueError(
                    f"The replay does not reproduce the recorded training: at step {t} the batch "
                    f"loss is {lv:.6g}, the recording's {rec:.6g}. The training data "
                    "(X, y) or the network differ from those of the recorded run."
                )
        for p in params:
            p.grad = None
        loss.backward()
        if hook is not None:
            hook.on_batch_end()
        _sgd_step(params, bufs, lr, sgd_kw)
        if check and (t + 1) in checkpoints:
            sd = checkpoints[t + 1]
            cur = net.state_dict()
            err = max(_rel_diff(cur[k], sd[k]) for k in sd)
            if err > rtol:
                raise ValueError(
                    f"The replay does not reproduce the recorded checkpoint at step {t + 1} "
                    f"(relative difference {err:.2e}): the training data or the network differ "
                    "from those of the recorded run."
                )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if hook is not None:
        hook.on_train_end()
    net.eval()
    return net
