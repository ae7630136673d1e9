"""Per-example gradients and Jacobians, as factored records or dense blocks.

Two engines produce the same thing, a list of *records* for a batch of examples, one record per
parameter group, from which kernels (:func:`gram`, :func:`self_gram`), projected features
(:func:`project`) and flat per-example gradients (:func:`flatten`) are built:

* ``"structured"``: forward hooks record each Linear / Conv layer's input ``a`` and one backward pass
  per output records the gradient ``delta`` at its output.  The per-example gradient of the weight
  is ``sum_s delta_s a_s^T`` and is never formed for Linear layers: the kernel of a dense layer is
  ``(a . a') (delta . delta')`` (the structured-derivative view of the eNTK).  BatchNorm (eval mode)
  and LayerNorm affine parameters use the captured normalised input.
* ``"vmap"``: ``torch.func.vmap(jacrev(functional_call))``, chunked; works for any module made of
  differentiable operations, and is the fallback for layers the structured engine does not know.

This module and :mod:`skattr.model` are the only places that touch ``nn.Module`` internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .projection import STRUCTURED

__all__ = [
    "KronRecord",
    "DenseRecord",
    "OUTPUTS",
    "output_values",
    "compute_records",
    "gram",
    "self_gram",
    "project",
    "records_shape",
    "flatten",
    "structured_support",
]


@dataclass
class KronRecord:
    """Per-example gradient ``sum_s d[n, s, o] a[n, s]^T`` of a weight (and bias, as a 1-column)."""

    key: str
    x: torch.Tensor  # (n, L, d_in - bias): the layer's input (patches for a Conv layer)
    d: torch.Tensor  # (n, L, m, d_out)
    bias: bool = False  # whether a ones column (the bias) closes ``a``

    @property
    def a(self):
        """The input with a column of ones appended when the bias is included, (n, L, d_in);
        formed on first use (forming a Conv layer's gradient does not need it)."""
        if not self.bias:
            return self.x
        a = self.__dict__.get("_a")
        if a is None:
            a = self._a = torch.cat([self.x, self.x.new_ones(*self.x.shape[:2], 1)], dim=-1)
            self.x = a[..., :-1]  # one buffer for both
        return a

    @property
    def L(self):
        return self.x.shape[1]

    @property
    def d_in(self):
        return self.x.shape[-1] + int(self.bias)

    @property
    def n_params(self):
        return self.d_in * self.d.shape[-1]

    def dense(self, cache=False):
        """The per-example gradients, (n, m, d_out * d_in); the bias, if any, is the last column
        of each row (see :func:`flatten` for parameter order).

        With ``cache=True`` the result is kept on the record (used for stored reference sets of
        shared-weight layers, whose kernel needs the gradient once per transform chunk).
        """
        g = getattr(self, "_dense", None)
        if g is not None:
            return g
        if self.L == 1:
            g = self.d[:, 0, :, :, None] * self.a[:, 0, None, None, :]
        else:  # sum over positions from the input itself; the bias column is the sum of d
            g = torch.einsum("nlmo,nli->nmoi", self.d, self.x)
            if self.bias:
                g = torch.cat([g, self.d.sum(1)[..., None]], dim=-1)
        g = g.flatten(2)  # (n, m, d_out * d_in): W row-major with the bias as a last column
        if cache:
            self._dense = g
        return g

    def nbytes(self):
        return (self.d.shape[0] * self.L * self.d_in + self.d.numel()) * self.d.element_size()

    def dense_nbytes(self):
        """Bytes of the dense gradients a kernel keeps for shared-weight layers (0 otherwise)."""
        if self.L == 1:
            return 0
        return self.d.shape[0] * self.d.shape[2] * self.n_params * self.d.element_size()


def _kron_to_param_order(g, key):
    # g: (n, m, d_out, d_in[+1]); return weight entries (row-major) then bias entries.
    if key.endswith("+bias"):
        w, b = g[..., :-1], g[..., -1]
        return torch.cat([w.reshape(*g.shape[:2], -1), b], dim=-1)
    return g.reshape(*g.shape[:2], -1)


@dataclass
class DenseRecord:
    key: str
    g: torch.Tensor  # (n, m, p)

    @property
    def n_params(self):
        return self.g.shape[-1]

    def dense(self, cache=False):
        return self.g

    def nbytes(self):
        return self.g.numel() * self.g.element_size()

    def dense_nbytes(self):
        return 0


# ----------------------------------------------------------------------------------------
# output functions: logits (n, C) [, y (n,)] -> (n, m)
# ----------------------------------------------------------------------------------------
def _logits(z, y, loss):
    return z


def _sum_logits(z, y, loss):
    return z.sum(-1, keepdim=True) / math.sqrt(z.shape[-1])


def _loss(z, y, loss):
    return loss(z, y)[:, None]


def _margin(z, y, loss):
    if z.shape[-1] == 1:  # binary, one logit: log(p/(1-p)) of the correct class
        sign = 2.0 * y.to(z.dtype) - 1.0
        return (sign * z[:, 0])[:, None]
    zc = z.gather(1, y[:, None])
    others = z.scatter(1, y[:, None], float("-inf"))
    return zc - torch.logsumexp(others, dim=1, keepdim=True)


OUTPUTS = {"logits": _logits, "sum_logits": _sum_logits, "loss": _loss, "margin": _margin}


def output_values(output, z, y, loss):
    if callable(output):
        v = output(z, y)
        return v[:, None] if v.ndim == 1 else v
    return OUTPUTS[output](z, y, loss)


# ----------------------------------------------------------------------------------------
# structured engine
# ----------------------------------------------------------------------------------------
_KRON = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class _Unsupported(Exception):
    pass


def _selected(module, prefixes):
    """{module_name: (module, [param names selected])} for leaf modules holding parameters."""
    out = {}
    for mname, mod in module.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        names = []
        for n, _ in own:
            full = f"{mname}.{n}" if mname else n
            if prefixes is None or any(full.startswith(pf) for pf in prefixes):
                names.append(n)
        if names:
            out[mname] = (mod, names)
    return out


def structured_support(module, prefixes=None):
    """``None`` if the structured engine handles ``module``, else the reason it does not."""
    for mname, (mod, _names) in _selected(module, prefixes).items():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return f"{mname}: Conv with groups/padding mode/str padding"
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not mod.track_running_stats:
                return f"{mname}: BatchNorm without running statistics"
        elif isinstance(mod, (nn.Linear, nn.LayerNorm, nn.GroupNorm)):
            pass
        else:
            return f"{mname}: {type(mod).__name__} is not a Linear, Conv or norm layer"
    return None


def _unfold(mod, x):
    """Conv input -> patches (n, L, C_in * prod(kernel))."""
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        ks, dil, pad, st = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
    else:
        ks, dil, pad, st = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (n, C*k, L)
    return cols.transpose(1, 2)


def _structured(module, specs, x, output, y, loss, outputs=None):
    captured = {}

    def make_hook(name):
        def hook(mod, inputs, out):
            if name in captured:
                raise _Unsupported(f"module {name!r} is called more than once per forward")
            captured[name] = (inputs[0].detach(), out, out._version)

        return hook

    handles = [specs[n][0].register_forward_hook(make_hook(n)) for n in specs]
    try:
        with torch.enable_grad():
            z = module(x)
            if z.ndim == 1:
                z = z[:, None]
            if outputs is not None:
                outputs["logits"] = z.detach()
            vals = output_values(output, z, y, loss)
            names = [n for n in specs if n in captured]
            for n in names:
                if captured[n][1]._version != captured[n][2]:
                    raise _Unsupported(f"the output of {n!r} is modified in place")
            outs = [captured[n][1] for n in names]
            m = vals.shape[1]
            deltas = [[] for _ in names]
            for o in range(m):
                gs = torch.autograd.grad(
                    vals[:, o].sum(), outs, retain_graph=o < m - 1, allow_unused=True
                )
                for i, g in enumerate(gs):
                    deltas[i].append(torch.zeros_like(outs[i]) if g is None else g)
    finally:
        for h in handles:
            h.remove()
    records = []
    for n, dl in zip(names, deltas):
        mod, pnames = specs[n]
        inp = captured[n][0]
        d = dl[0].unsqueeze(1) if len(dl) == 1 else torch.stack(dl, dim=1)  # (n, m, *out_shape)
        records.extend(_layer_records(n, mod, pnames, inp, d))
    return records


def _layer_records(name, mod, pnames, inp, d):
    n, m = d.shape[:2]
    recs = []
    if isinstance(mod, _KRON):
        if isinstance(mod, nn.Linear):
            a = inp.reshape(n, -1, inp.shape[-1])  # (n, L, d_in)
            dd = d.reshape(n, m, -1, d.shape[-1]).transpose(1, 2)  # (n, L, m, d_out)
        else:
            a = _unfold(mod, inp)
            dd = d.reshape(n, m, d.shape[2], -1).permute(0, 3, 1, 2)  # (n, L, m, C_out)
        has_w, has_b = "weight" in pnames, "bias" in pnames
        if has_w:
            key = f"{name}.weight" + ("+bias" if has_b else "")
            recs.append(KronRecord(key, a, dd, bias=has_b))
        elif has_b:
            recs.append(DenseRecord(f"{name}.bias", dd.sum(1)))
        return recs
    # norm layers: y = w * xhat + b, per-channel (BN, GroupNorm) or per-element (LayerNorm)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        xhat = F.batch_norm(inp, mod.running_mean, mod.running_var, None, None, False, 0.0, mod.eps)
        gw = torch.einsum("nmc...,nc...->nmc", d, xhat) if xhat.ndim > 2 else d * xhat[:, None]
        gb = d.sum(dim=tuple(range(3, d.ndim))) if d.ndim > 3 else d
    elif isinstance(mod, nn.GroupNorm):
        xhat = F.group_norm(inp, mod.num_groups, None, None, mod.eps)
        gw = (d * xhat[:, None]).flatten(3).sum(-1) if xhat.ndim > 2 else d * xhat[:, None]
        gb = d.flatten(3).sum(-1) if d.ndim > 3 else d
    else:  # LayerNorm: parameters have the normalized shape; sum over leading positions
        xhat = F.layer_norm(inp, mod.normalized_shape, None, None, mod.eps)
        nd = len(mod.normalized_shape)
        prod = d * xhat[:, None]
        lead = tuple(range(2, d.ndim - nd))
        gw = (prod.sum(lead) if lead else prod).reshape(n, m, -1)
        gb = (d.sum(lead) if lead else d).reshape(n, m, -1)
    if "weight" in pnames:
        recs.append(DenseRecord(f"{name}.weight", gw.reshape(n, m, -1)))
    if "bias" in pnames:
        recs.append(DenseRecord(f"{name}.bias", gb.reshape(n, m, -1)))
    return recs


# ----------------------------------------------------------------------------------------
# vmap engine
# ----------------------------------------------------------------------------------------
def _vmap(module, prefixes, x, output, y, loss):
    sel = _selected(module, prefixes)
    names = [f"{mn}.{pn}" if mn else pn for mn, (_, pns) in sel.items() for pn in pns]
    params = {k: v.detach() for k, v in module.named_parameters() if k in names}
    others = {k: v.detach() for k, v in module.named_parameters() if k not in params}
    others.update(dict(module.named_buffers()))

    def f(p, xi, yi):
        z = functional_call(module, ({**p, **others},), (xi[None],))
        if z.ndim == 1:
            z = z[:, None]
        return output_values(output, z, yi[None], loss)[0]

    with torch.enable_grad():
        jac = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x, y)
    n = x.shape[0]
    return [DenseRecord(k, jac[k].reshape(n, jac[k].shape[1], -1)) for k in names]


def compute_records(module, x, *, output="logits", y=None, loss=None, prefixes=None, method="auto",
                    outputs=None):
    """Records of per-example gradients of ``output`` for the batch ``x``.

    ``module`` must be in eval mode (examples independent of each other).  A dict passed as
    ``outputs`` receives the batch's network outputs (n, C) under ``"logits"`` (from the same
    forward pass when the structured engine runs).
    """
    if y is None:
        y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if method in ("auto", "structured"):
        reason = structured_support(module, prefixes)
        if reason is None:
            specs = _selected(module, prefixes)
            try:
                return _structured(module, specs, x, output, y, loss, outputs)
            except _Unsupported as exc:
                reason = str(exc)
        if method == "structured":
            raise ValueError(f"The structured gradient engine cannot handle this model: {reason}.")
    if outputs is not None:
        with torch.no_grad():
            z = module(x)
        outputs["logits"] = z[:, None] if z.ndim == 1 else z
    return _vmap(module, prefixes, x, output, y, loss)


# ----------------------------------------------------------------------------------------
# contractions
# ----------------------------------------------------------------------------------------
def gram(rx, ry, mode="trace"):
    """Kernel between two record lists: (n, n') for ``mode="trace"``, (n, n', m, m) for "full"."""
    K = None
    for a, b in zip(rx, ry):
        if isinstance(a, KronRecord) and a.L == 1:
            AA = a.a[:, 0] @ b.a[:, 0].T
            if mode == "trace":
                da, db = a.d[:, 0].flatten(1), b.d[:, 0].flatten(1)
                term = AA * (da @ db.T)
            else:
                term = AA[:, :, None, None] * torch.einsum("nmo,Npo->nNmp", a.d[:, 0], b.d[:, 0])
        else:
            ga, gb = a.dense(cache=True), b.dense(cache=True)
            if mode == "trace":
                term = ga.flatten(1) @ gb.flatten(1).T
            else:
                term = torch.einsum("nmp,Nop->nNmo", ga, gb)
        K = term if K is None else K + term
    return K


def self_gram(rx, mode="trace"):
    """The diagonal ``K(x, x)``: (n,) for "trace", (n, m, m) for "full"."""
    K = None
    for a in rx:
        if isinstance(a, KronRecord) and a.L == 1:
            aa = (a.a[:, 0] ** 2).sum(-1)
            if mode == "trace":
                term = aa * (a.d[:, 0] ** 2).sum((-1, -2))
            else:
                term = aa[:, None, None] * torch.einsum("nmo,npo->nmp", a.d[:, 0], a.d[:, 0])
        else:
            g = a.dense(cache=True)
            term = (g**2).sum((-1, -2)) if mode == "trace" else torch.einsum("nmp,nop->nmo", g, g)
        K = term if K is None else K + term
    return K


def project(records, projector, out=None):
    """Unscaled projected features (n, m, k) of the per-example gradients in ``records``.

    ``out``, if given, is accumulated into.  Under ``"factored"`` / ``"kronecker"`` a Linear / Conv
    weight is projected from its (input, output-gradient) pair, except a layer applied at many
    positions (a Conv layer) whose gradient is small: its factored cost ``O(L k (d_in + m d_out))``
    per example (memory-bound element-wise work) exceeds forming the gradient (``L d_in d_out``)
    and projecting it (:meth:`Projector.project_formed`: cached dense Gaussian rows, or the same
    kronecker rows), which is then done (about 10x faster on a small CNN).  Both row sets are seeded per parameter group and nested,
    so features stay deterministic across batch sizes and processes.
    """
    if out is None:
        n, m = records_shape(records)
        out = torch.zeros(n, m, projector.k, device=projector.device, dtype=projector.dtype)
    for r in records:
        if isinstance(r, KronRecord) and projector.kind in STRUCTURED:
            if _dense_cheaper(r):  # form the gradient, then project it
                g = r.dense()
                projector.project_formed(r.key, g.view(*g.shape[:2], r.d.shape[-1], r.d_in), out)
            else:
                projector.project_factored(r.key, r.a, r.d, out)
        else:
            projector.project_dense(r.key, r.dense(), out)
    return out


_HYBRID_MAX_P = 2**16


def records_shape(records):
    """``(n_samples, n_outputs)`` of a batch of gradient records."""
    r0 = records[0]
    return (r0.d.shape[0], r0.d.shape[2]) if isinstance(r0, KronRecord) else tuple(r0.g.shape[:2])


def _dense_cheaper(r):
    # decided from the layer's shape alone (never from k or the cache state), so that every
    # projection size and every extension of a nested projection uses the same kind of rows
    L, d_in, d_out, m = r.L, r.d_in, r.d.shape[-1], r.d.shape[2]
    p = d_in * d_out
    return L > 1 and p <= _HYBRID_MAX_P and m * p <= 4 * L * (d_in + m * d_out)


def flatten(records):
    """Per-example gradients (n, m, p), parameters in module order (weight before bias)."""
    parts = []
    for r in records:
        g = r.dense()
        if isinstance(r, KronRecord):
            g = _kron_to_param_order(g.reshape(*g.shape[:2], r.d.shape[-1], r.d_in), r.key)
        parts.append(g)
    return torch.cat(parts, dim=-1)
