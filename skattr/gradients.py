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
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from . import _memory
from ._linalg import sym_gram
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
    "n_parameters",
    "DeferredRecords",
    "ENGINES",
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
# parameter selection (each Parameter once, under its first name)
# ----------------------------------------------------------------------------------------
_KRON = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class _Unsupported(Exception):
    pass


def _aliases(module):
    """{id(param): [every full name of that Parameter]} for trainable parameters."""
    out = {}
    for mname, mod in module.named_modules(remove_duplicate=False):
        for n, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                full = f"{mname}.{n}" if mname else n
                names = out.setdefault(id(p), [])
                if full not in names:
                    names.append(full)
    return out


def _is_selected(names, prefixes):
    # a tied Parameter is selected when any of its names is: its gradient sums over every use
    return prefixes is None or any(nm.startswith(pf) for nm in names for pf in prefixes)


def _unique_selected(module, prefixes):
    """``[(name, param)]`` of the selected trainable parameters, each once, in the order (and
    under the names) of ``module.named_parameters()``."""
    al = _aliases(module)
    return [(n, p) for n, p in module.named_parameters()
            if p.requires_grad and _is_selected(al[id(p)], prefixes)]


def _selected(module, prefixes):
    """{module_name: (module, [param names selected])} for modules holding selected parameters
    (a module holding a tied Parameter is listed under each of its names)."""
    al = _aliases(module)
    out = {}
    for mname, mod in module.named_modules():
        names = [n for n, p in mod.named_parameters(recurse=False)
                 if p.requires_grad and _is_selected(al[id(p)], prefixes)]
        if names:
            out[mname] = (mod, names)
    return out


def _label(mname):
    """A module's name in a message: the network itself (name ``""``) is ``<root>``."""
    return mname or "<root>"


def _recurrent(module):
    """The first recurrent layer (name, type name) in ``module``, or None."""
    for mname, mod in module.named_modules():
        if isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            return _label(mname), type(mod).__name__
    return None


def n_parameters(module, prefixes=None):
    """The number of parameters the per-example gradients cover (the width of
    :func:`flatten`): the trainable ones selected by ``prefixes``, a tied Parameter once."""
    return int(sum(p.numel() for _, p in _unique_selected(module, prefixes)))


def structured_support(module, prefixes=None):
    """``None`` if the structured engine handles ``module``, else the reason it does not."""
    for mname, (mod, _names) in _selected(module, prefixes).items():
        mname = _label(mname)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return f"{mname}: Conv with groups/padding mode/str padding"
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not mod.track_running_stats:
                return f"{mname}: BatchNorm without running statistics"
        elif isinstance(mod, nn.Embedding):
            if mod.max_norm is not None or mod.scale_grad_by_freq:
                return f"{mname}: Embedding with max_norm or scale_grad_by_freq"
        elif isinstance(mod, (nn.Linear, nn.LayerNorm, nn.GroupNorm)):
            pass
        else:
            return (f"{mname}: {type(mod).__name__} is not a Linear, Conv, Embedding or norm "
                    "layer")
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


# ----------------------------------------------------------------------------------------
# structured engine
# ----------------------------------------------------------------------------------------
# Modules whose output (or input) a forward pass modifies in place, learnt on a first run: their
# hooked output is then cloned (the clone goes on and is modified; the gradient is taken at
# the untouched original) and their captured input copied.  Keyed weakly by the network.
_INPLACE = weakref.WeakKeyDictionary()


def _structured(module, specs, x, output, y, loss, outputs=None):
    known = _INPLACE.setdefault(module, (set(), set()))
    for _ in range(4):  # each retry adds the layers found modified in place
        try:
            return _structured_once(module, specs, x, output, y, loss, outputs, *known)
        except _Retry as exc:
            known[0].update(exc.outs)
            known[1].update(exc.inps)
    raise _Unsupported("tensors are modified in place in a way the hooks cannot follow")


class _Retry(Exception):
    def __init__(self, outs, inps):
        super().__init__("retry")
        self.outs, self.inps = outs, inps


def _structured_once(module, specs, x, output, y, loss, outputs, clone_out, clone_in):
    captured = {}  # name -> list of (input, output, output version, input version), one per call

    def make_hook(name):
        def hook(mod, inputs, out):
            inp = inputs[0].detach()
            if name in clone_in:
                inp = inp.clone()
            captured.setdefault(name, []).append((inp, out, out._version, inputs[0]._version,
                                                  inputs[0]))
            if name in clone_out:
                return out.clone()
            return None

        return hook

    handles = [specs[n][0].register_forward_hook(make_hook(n)) for n in specs]
    try:
        with torch.enable_grad():
            z = module(x)
            if z.ndim == 1:
                z = z[:, None]
            vals = output_values(output, z, y, loss)
            missing = [n for n in specs if n not in captured]
            if missing:
                # a layer never called: its parameters are either unused (a forward pass that
                # stops early, as a probe's does: left out, as before) or used another way
                ps = [getattr(specs[n][0], pn) for n in missing for pn in specs[n][1]]
                used = torch.autograd.grad(vals.sum(), ps, retain_graph=True, allow_unused=True)
                if any(g is not None for g in used):
                    raise _Unsupported(f"{_label(missing[0])!r} holds selected parameters but its "
                                       "forward is never called (its parameters are used "
                                       "another way)")
                specs = {n: v for n, v in specs.items() if n in captured}
            bad_out = {n for n in specs for c in captured[n] if c[1]._version != c[2]}
            bad_in = {n for n in specs for c in captured[n]
                      if n not in clone_in and c[4]._version != c[3]}
            if bad_out or bad_in:
                raise _Retry(bad_out, bad_in)
            if outputs is not None:
                outputs["logits"] = z.detach()
            uses = [(n, c) for n in specs for c in captured[n]]
            outs = [c[1] for _, c in uses]
            m = vals.shape[1]
            # (n, m, *out_shape) per use, filled output by output: no list of m gradients
            # next to a stacked copy
            deltas = [u.new_empty(u.shape[0], m, *u.shape[1:]) for u in outs]
            for o in range(m):
                gs = torch.autograd.grad(
                    vals[:, o].sum(), outs, retain_graph=o < m - 1, allow_unused=True
                )
                for i, g in enumerate(gs):
                    if g is None:
                        deltas[i][:, o] = 0
                    else:
                        deltas[i][:, o] = g
                del gs
    finally:
        for h in handles:
            h.remove()
    if all(len(captured[n]) == 1 for n in specs) and not _tied(specs):
        records = []
        for (n, c), d in zip(uses, deltas):
            mod, pnames = specs[n]
            records.extend(_layer_records(n, mod, pnames, c[0], d))
        return records
    return _merged_records(module, specs, uses, deltas)


def _tied(specs):
    seen = set()
    for mod, pnames in specs.values():
        for pn in pnames:
            pid = id(getattr(mod, pn))
            if pid in seen:
                return True
            seen.add(pid)
    return False


def _merged_records(module, specs, uses, deltas):
    """Records when a Parameter is used more than once (a module called several times, or a
    Parameter tied between modules): one record per Parameter, the sum over its uses.

    Uses of a weight that are all Linear/Conv layers of one shape are kept factored: the
    gradient ``sum_u sum_s d_{u,s} a_{u,s}^T`` is one KronRecord over the concatenated positions
    of all uses.  Any other mix (an Embedding tied to a decoder) is summed densely.
    """
    names = {id(p): n for n, p in module.named_parameters()}  # canonical names, in order
    parts = {}  # canonical name -> list of records (one per use) in parameter layout
    for (mname, c), d in zip(uses, deltas):
        mod, pnames = specs[mname]
        for pn in pnames:  # one record per parameter: a shared weight keeps no bias column
            for r in _layer_records(mname, mod, [pn], c[0], d):
                parts.setdefault(names[id(getattr(mod, pn))], []).append(r)
    records = []
    for key in [n for n in names.values() if n in parts]:
        rs = parts[key]
        if len(rs) == 1:
            r = rs[0]
            r.key = key
            records.append(r)
        elif all(isinstance(r, KronRecord) and not r.bias for r in rs) and len(
            {(r.x.shape[-1], r.d.shape[-1]) for r in rs}
        ) == 1:
            records.append(KronRecord(key, torch.cat([r.x for r in rs], 1),
                                      torch.cat([r.d for r in rs], 1)))
        else:
            g = rs[0].dense()
            for r in rs[1:]:
                g = g + r.dense()
            records.append(DenseRecord(key, g))
    return records


def selected_modules(module, prefixes=None):
    """``{module_name: (module, [names of its selected parameters])}`` for the modules holding
    parameters selected by ``prefixes`` (None: every trainable parameter); a module holding a
    tied Parameter is listed under each of its names."""
    return _selected(module, prefixes)


def has_tied_parameters(selection):
    """Whether one Parameter appears more than once in a :func:`selected_modules` selection."""
    return _tied(selection)


def layer_records(name, module, param_names, inputs, output_grads):
    """Per-example gradient records of one layer (Linear, Conv1d/2d, Embedding, LayerNorm,
    GroupNorm, BatchNorm in eval) from its input ``inputs`` (n, ...) and the gradients
    ``output_grads`` (n, m, *output shape) of ``m`` scalar outputs per example with respect to
    its output; ``param_names`` are the module's parameters to record."""
    return _layer_records(name, module, param_names, inputs, output_grads)


__all__ += ["selected_modules", "has_tied_parameters", "layer_records"]


def _layer_records(name, mod, pnames, inp, d):
    n, m = d.shape[:2]
    recs = []
    if isinstance(mod, nn.Embedding):
        # the gradient of the table is d scattered into the rows of the looked-up ids
        idx = inp.reshape(n, -1)
        dd = d.reshape(n, m, idx.shape[1], -1)
        g = d.new_zeros(n, m, mod.num_embeddings, dd.shape[-1])
        g.scatter_add_(2, idx[:, None, :, None].expand_as(dd), dd)
        if mod.padding_idx is not None:
            g[:, :, mod.padding_idx] = 0
        return [DenseRecord(f"{name}.weight", g.reshape(n, m, -1))]
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
# vmap and autograd engines
# ----------------------------------------------------------------------------------------
def _vmap(module, prefixes, x, output, y, loss):
    sel = _unique_selected(module, prefixes)
    params = {k: v.detach() for k, v in sel}
    others = {k: v.detach() for k, v in module.named_parameters() if k not in params}
    others.update(dict(module.named_buffers()))

    def f(p, xi, yi):
        # tied names are not passed: functional_call's tie_weights gives every alias the value
        z = functional_call(module, ({**p, **others},), (xi[None],))
        if z.ndim == 1:
            z = z[:, None]
        return output_values(output, z, yi[None], loss)[0]

    with torch.enable_grad():
        jac = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x, y)
    n = x.shape[0]
    return [DenseRecord(k, jac[k].reshape(n, jac[k].shape[1], -1)) for k in params]


def _autograd(module, prefixes, x, output, y, loss):
    """One example at a time, one ``torch.autograd.grad`` per output: works for any module
    autograd can differentiate (recurrent layers included), at a Python loop's speed."""
    sel = _unique_selected(module, prefixes)
    params = [p for _, p in sel]
    out = None  # (n, m, p_j) per parameter, written example by example
    # cuDNN's RNN backward refuses eval mode; the native kernels do not
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        for i in range(x.shape[0]):
            z = module(x[i : i + 1])
            if z.ndim == 1:
                z = z[:, None]
            v = output_values(output, z, y[i : i + 1], loss)[0]
            if out is None:
                out = [p.new_empty(x.shape[0], v.shape[0], p.numel()) for p in params]
            for o in range(v.shape[0]):
                gs = torch.autograd.grad(v[o], params, retain_graph=o < v.shape[0] - 1,
                                         allow_unused=True)
                for j, g in enumerate(gs):
                    if g is None:
                        out[j][i, o] = 0
                    else:
                        out[j][i, o] = g.reshape(-1)
    return [DenseRecord(k, g) for (k, _), g in zip(sel, out)]


# ----------------------------------------------------------------------------------------
# engine choice, memory planning and chunking
# ----------------------------------------------------------------------------------------
ENGINES = ("structured", "vmap", "autograd")
_METHODS = ("auto", *ENGINES)


def _choose(module, prefixes, method):
    """``(engine, reason)`` before running: structured when supported (under "auto"), else
    vmap, else per-example autograd for what torch.func cannot batch."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}.")
    if method in ("auto", "structured"):
        reason = structured_support(module, prefixes)
        if reason is None:
            return "structured", "every layer holding selected parameters has a structured record"
        if method == "structured":
            raise ValueError(f"The structured gradient engine cannot handle this model: {reason}.")
    else:
        reason = f"method={method!r} was requested"
    if method == "autograd":
        return "autograd", reason
    rec = _recurrent(module)
    if rec is not None:
        return "autograd", (f"{reason}; {rec[0]}: {rec[1]} is recurrent and cannot run under "
                            "torch.func.vmap, so per-example autograd is used")
    return "vmap", reason


_PROBES = weakref.WeakKeyDictionary()


def _probe(module, x, output, y, loss, prefixes, engine, specs=None):
    """``(per, fixed, m, kept, groups, formed)`` of ``engine`` on this network and input shape
    (cached): bytes per example of a chunk (its records and working memory), fixed bytes, the
    number of outputs, the bytes per example of the records alone (what a caller keeps), the
    records' parameter groups ``[(key, d_out, d_in, factored)]`` (for a projector's rows), and
    ``[(d_out * d_in, factored)]`` of the structured engine's factored records (what a
    projection that forms their gradient holds, see :func:`_formed_bytes`).

    The structured engine is run on one example and its records measured (with the formed
    gradients a kernel keeps for Conv layers); the other engines' records are ``m`` gradients
    of every parameter.  Working memory comes from one no-grad forward pass: the activations
    (saved for the backward, and their gradients) and, for the structured engine, the gradient
    buffers at the hooked outputs.
    """
    okey = output if isinstance(output, str) else id(output)
    key = (tuple(x.shape[1:]), x.dtype, okey, None if prefixes is None else tuple(prefixes), engine)
    cache = _PROBES.setdefault(module, {})
    if key in cache:
        return cache[key]
    leaf = [m for m in module.modules() if next(m.children(), None) is None]
    sel = _selected(module, prefixes) if engine == "structured" else {}
    sel_ids = {id(mod) for mod, _ in sel.values()}
    act, hooked = [0], [0]

    def numel(t):
        if isinstance(t, torch.Tensor):
            return t.numel()
        if isinstance(t, (tuple, list)):
            return sum(numel(u) for u in t)
        return 0

    def hook(mod, inputs, out):
        k = numel(out)
        act[0] += k
        if id(mod) in sel_ids:
            hooked[0] += k

    handles = [m.register_forward_hook(hook) for m in leaf]
    try:
        with torch.no_grad():
            z = module(x[:1])
    finally:
        for h in handles:
            h.remove()
    z = z[:, None] if z.ndim == 1 else z
    m = output_values(output, z, y[:1], loss).shape[1]
    isz = torch.finfo(z.dtype).bits // 8 if z.is_floating_point() else 4
    P = sum(p.numel() for _, p in _unique_selected(module, prefixes))
    A = act[0] + numel(x[:1]) + z.numel()
    if engine == "structured":
        # the records of one example, measured (raises _Unsupported like the engine does);
        # working: saved activations, one backward's activation gradients, the gradient
        # buffers at the hooked outputs (one per output) and one backward's gradients there
        recs = _structured(module, specs if specs is not None else sel, x[:1], output, y[:1],
                           loss)
        kept = sum(r.nbytes() + r.dense_nbytes() for r in recs)
        per, fixed = kept + isz * (3 * A + (m + 1) * hooked[0]), 0
        groups = [(r.key, r.d.shape[-1], r.d_in, not _dense_cheaper(r))
                  if isinstance(r, KronRecord) else (r.key, 1, r.n_params, False) for r in recs]
        formed = [(r.n_params, not _dense_cheaper(r)) for r in recs
                  if isinstance(r, KronRecord) and r.L == 1]
    elif engine == "vmap":
        # jacrev vmaps the backward over the m outputs: m copies of the activations'
        # gradients next to the saved forward; the Jacobian rows are the records
        kept = isz * m * P
        per, fixed = kept + isz * (3 * A + 2 * m * A), 0
    else:  # autograd: one example at a time into preallocated records
        kept = isz * m * P
        per, fixed = kept, isz * (3 * A + 3 * P)
    if engine != "structured":
        groups = [(k, 1, p.numel(), False) for k, p in _unique_selected(module, prefixes)]
        formed = []
    cache[key] = (int(per), int(fixed), int(m), int(kept), groups, formed)
    return cache[key]


def _formed_bytes(formed, projector, m):
    """Bytes per example a projection holds while it projects the formed gradient of one
    factored record (a kind without factored rows, e.g. the default Rademacher, forms every
    Linear layer's gradient, (n, m, d_out * d_in), one layer at a time): the largest one."""
    isz = torch.finfo(projector.dtype).bits // 8
    sizes = [p for p, factored in formed if not (factored and projector.kind in STRUCTURED)]
    return isz * m * max(sizes, default=0)


def _run(engine, module, prefixes, specs, x, output, y, loss, outputs):
    if engine == "structured":
        return _structured(module, specs, x, output, y, loss, outputs)
    recs = (_vmap if engine == "vmap" else _autograd)(module, prefixes, x, output, y, loss)
    if outputs is not None:
        with torch.no_grad():
            z = module(x)
        outputs["logits"] = z[:, None] if z.ndim == 1 else z
    return recs


def _cat_records(chunks):
    """Concatenate per-chunk record lists along the examples."""
    out = []
    for rs in zip(*chunks):
        r0 = rs[0]
        if isinstance(r0, KronRecord):
            out.append(KronRecord(r0.key, torch.cat([r.x for r in rs]),
                                  torch.cat([r.d for r in rs]), bias=r0.bias))
        else:
            out.append(DenseRecord(r0.key, torch.cat([r.g for r in rs])))
    return out


def _slice_records(records, i0, i1):
    return [KronRecord(r.key, r.x[i0:i1], r.d[i0:i1], bias=r.bias) if isinstance(r, KronRecord)
            else DenseRecord(r.key, r.g[i0:i1]) for r in records]


class DeferredRecords:
    """Records of a batch too large for the memory budget, computed chunk by chunk on use.

    :func:`project`, :func:`gram`, :func:`self_gram`, :func:`flatten` and
    :func:`records_shape` process it one chunk at a time (``chunks()``); any other use
    (iteration, indexing) computes all the records at once.
    """

    def __init__(self, compute, n, m, chunk_size):
        self._compute, self.n, self.m, self.chunk_size = compute, n, m, chunk_size
        self._all = None

    def chunks(self, start=0):
        """Yield ``(i0, i1, records)`` of consecutive chunks (those from example ``start`` on,
        ``start`` a chunk boundary).  Each chunk is computed when the next one is asked for:
        a consumer drops its reference first, so that two chunks are never held at once."""
        for i0 in range(start, self.n, self.chunk_size):
            i1 = min(self.n, i0 + self.chunk_size)
            if self._all is not None:  # formed already (iterated): slices, not a recomputation
                yield i0, i1, _slice_records(self._all, i0, i1)
            else:
                yield i0, i1, self._compute(i0, i1)

    def _records(self):
        if self._all is None:
            self._all = _cat_records([r for _, _, r in self.chunks()])
        return self._all

    def __iter__(self):
        return iter(self._records())

    def __len__(self):
        return len(self._records())

    def __getitem__(self, i):
        return self._records()[i]


def _chunks_of(records, start=0):
    if isinstance(records, DeferredRecords):
        yield from records.chunks(start)
    elif start == 0:
        yield 0, records_shape(records)[0], records


def compute_records(module, x, *, output="logits", y=None, loss=None, prefixes=None, method="auto",
                    outputs=None, budget=None, info=None, reserved=0, projector=None):
    """Records of per-example gradients of ``output`` for the batch ``x``.

    Parameters
    ----------
    module : torch.nn.Module
        In eval mode (examples independent of each other).
    x : torch.Tensor of shape (n, ...)
        The batch; floating inputs in the module's dtype, integer inputs (token ids) as they are.
    output, y, loss, prefixes
        See the documentation's gradients page (``gradients.html``).
    method : {"auto", "structured", "vmap", "autograd"}, default="auto"
        "auto": the structured engine when it handles the model, else ``torch.func.vmap``, else
        (recurrent layers, or vmap failing) a per-example autograd loop.  "vmap" skips the
        structured engine (and still falls back to autograd where vmap cannot run).
    outputs : dict, optional
        Receives the batch's network outputs (n, C) under ``"logits"``.
    budget : int or str, optional
        Memory budget in bytes (:mod:`skattr._memory`; default ``$SKATTR_MEMORY_BUDGET`` or
        1 GiB).  The batch is processed in chunks whose records and working memory fit it,
        next to ``reserved`` and ``projector``'s rows; when the records of the whole batch do
        not fit as well, a :class:`DeferredRecords` is returned and computed chunk by chunk
        where it is used.  A share of the budget (:data:`skattr._memory.SLACK`) is left to
        the allocator.  ``MemoryError`` when one example does not fit.
    info : dict, optional
        Filled with ``engine`` ("structured", "vmap" or "autograd"), ``reason`` (why that
        engine), ``chunk_size``, ``n_chunks``, ``deferred``, ``bytes_per_example``,
        ``kept_bytes_per_example`` (the records alone), ``fixed_bytes`` (the engine's,
        ``reserved`` and the projector's rows) and ``budget``.
    reserved : int, default=0
        Bytes the caller holds during the call and counts against the budget (its output
        rows).
    projector : Projector, optional
        The projection the records are for: the rows it will draw for them
        (:meth:`skattr.projection.Projector.planned_bytes`) count against the budget.

    Returns
    -------
    list of records (or :class:`DeferredRecords`)
    """
    if y is None:
        y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    engine, reason = _choose(module, prefixes, method)
    specs = _selected(module, prefixes) if engine == "structured" else None
    limit = _memory.memory_budget(budget)
    n = x.shape[0]
    report = {} if info is None else info
    report.clear()

    def plan(engine):
        per, fixed, m, kept, groups, formed = _probe(module, x, output, y, loss, prefixes,
                                                     engine, specs)
        if projector is not None:
            per += _formed_bytes(formed, projector, m)
        held = []  # what the fixed bytes hold besides the engine, named in a MemoryError
        if projector is not None:
            pb = projector.planned_bytes(groups)
            fixed += pb
            if pb:
                held.append(f"{pb / 2**20:.1f} MiB of projection rows (projection_dim="
                            f"{projector.k}, kind {projector.kind!r}: a smaller projection_dim "
                            "or another kind holds less)")
        if reserved and fixed + int(reserved) + per > _memory.usable(limit) >= fixed + per:
            # the caller's output alone leaves no room: it is not the working memory's to
            # give back, so the budget then bounds the working memory only (said, not silent)
            warnings.warn(
                f"The output of this call ({int(reserved) / 2**20:.1f} MiB) does not fit the "
                f"memory budget ({limit / 2**20:.1f} MiB) next to one example's working memory "
                f"({(fixed + per) / 2**20:.1f} MiB); the budget bounds the working memory only. "
                f"Raise it (budget=..., or {_memory.ENV_VAR}) to bound both.",
                UserWarning, stacklevel=3)
        else:
            fixed += int(reserved)
            if reserved:
                held.append(f"{int(reserved) / 2**20:.1f} MiB of this call's output")
        what = f"The {engine} gradient engine" + (f" (holding {' and '.join(held)})" if held else "")
        c = _memory.plan_chunk(n, per, limit, fixed=fixed, what=what)
        report.update(engine=engine, bytes_per_example=per, kept_bytes_per_example=kept,
                      fixed_bytes=fixed, budget=limit)
        return c, m, per, kept, fixed

    def run(engine, i0, i1):
        outs = {} if outputs is not None else None
        recs = _run(engine, module, prefixes, specs, x[i0:i1], output, y[i0:i1], loss, outs)
        return recs, None if outs is None else outs["logits"]

    first = None  # the first chunk's (records, logits), from trying the engine on it
    try:
        chunk, m, per, kept, fixed = plan(engine)  # runs the structured engine on one example
        if engine == "structured":
            first = run(engine, 0, chunk)
    except _Unsupported as exc:
        if method == "structured":
            raise ValueError(
                f"The structured gradient engine cannot handle this model: {exc}."
            ) from None
        reason = str(exc)
        engine = "autograd" if _recurrent(module) else "vmap"
        chunk, m, per, kept, fixed = plan(engine)
    if engine == "vmap" and first is None:
        try:
            first = run(engine, 0, chunk)
        except RuntimeError as exc:  # an operation torch.func cannot batch
            reason = (f"{reason}; torch.func.vmap failed ({str(exc).splitlines()[0][:200]}), so "
                      "per-example autograd is used")
            engine = "autograd"
            chunk, m, per, kept, fixed = plan(engine)
    report.update(engine=engine, reason=reason, chunk_size=chunk,
                  n_chunks=-(-n // chunk), deferred=False)
    # all records kept at once: the chunks' records, their concatenation, and one chunk's
    # working memory; else computed chunk by chunk where they are used
    whole = kept * n * (1 if chunk >= n else 2) + (per - kept) * chunk + fixed
    if chunk < n and whole > _memory.usable(limit):
        report["deferred"] = True
        if outputs is not None:
            with torch.no_grad():
                zs = [module(x[i : i + chunk]) for i in range(0, n, chunk)]
            outputs["logits"] = torch.cat([z[:, None] if z.ndim == 1 else z for z in zs])
        return DeferredRecords(lambda i0, i1: run(engine, i0, i1)[0], n, m, chunk)
    parts = [first if i0 == 0 and first is not None else run(engine, i0, min(n, i0 + chunk))
             for i0 in range(0, n, chunk)]
    if outputs is not None:
        outputs["logits"] = torch.cat([z for _, z in parts])
    recs = [r for r, _ in parts]
    return recs[0] if len(recs) == 1 else _cat_records(recs)


# ----------------------------------------------------------------------------------------
# contractions
# ----------------------------------------------------------------------------------------
def gram(rx, ry, mode="trace"):
    """Kernel between two record lists: (n, n') for ``mode="trace"``, (n, n', m, m) for "full"."""
    if not isinstance(rx, DeferredRecords) and not isinstance(ry, DeferredRecords):
        return _gram(rx, ry, mode)
    nx, ny = records_shape(rx)[0], records_shape(ry)[0]
    same = rx is ry  # symmetric: blocks below the diagonal are mirrored, not recomputed
    K = None

    def put(i0, i1, j0, j1, blk):
        nonlocal K
        if K is None:
            K = blk.new_empty(nx, ny, *blk.shape[2:])
        K[i0:i1, j0:j1] = blk
        if same and j0 != i0:
            K[j0:j1, i0:i1] = blk.T if mode == "trace" else blk.permute(1, 0, 3, 2)

    for i0, i1, a in _chunks_of(rx):
        if same:
            put(i0, i1, i0, i1, _gram(a, a, mode))
        for j0, j1, b in _chunks_of(ry, start=i1 if same else 0):
            put(i0, i1, j0, j1, _gram(a, b, mode))
            del b  # released before the next chunk is computed (the planner counts two)
        del a
    return K


def _gram(rx, ry, mode):
    # a trace Gram of records with themselves is symmetric: the formed (Conv, dense) blocks
    # are contracted from upper-triangle panels (about half the multiply-adds of a GEMM)
    sym = rx is ry and mode == "trace"
    K = None
    for a, b in zip(rx, ry):
        if isinstance(a, KronRecord) and a.L == 1:
            AA = a.a[:, 0] @ b.a[:, 0].T
            if mode == "trace":
                da, db = a.d[:, 0].flatten(1), b.d[:, 0].flatten(1)
                term = AA * (da @ db.T)
            else:
                term = AA[:, :, None, None] * torch.einsum("nmo,Npo->nNmp", a.d[:, 0], b.d[:, 0])
        elif sym:
            K = sym_gram(a.dense(cache=True).flatten(1), base=K)
            continue
        else:
            ga, gb = a.dense(cache=True), b.dense(cache=True)
            if mode == "trace":
                term = ga.flatten(1) @ gb.flatten(1).T
            else:
                term = torch.einsum("nmp,Nop->nNmo", ga, gb)
        K = term if K is None else K + term
    if sym:  # exactly symmetric (the factored terms' products are not, to rounding)
        K = K.triu() + K.triu(1).T
    return K


def self_gram(rx, mode="trace"):
    """The diagonal ``K(x, x)``: (n,) for "trace", (n, m, m) for "full"."""
    if isinstance(rx, DeferredRecords):
        parts = []
        for _, _, r in rx.chunks():
            parts.append(_self_gram(r, mode))
            del r  # released before the next chunk is computed
        return torch.cat(parts)
    return _self_gram(rx, mode)


def _self_gram(rx, mode):
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
            if mode == "trace":  # a norm reduction, no squared temporary (about 10x faster)
                term = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
            else:
                term = torch.einsum("nmp,nop->nmo", g, g)
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
    if isinstance(records, DeferredRecords):
        for i0, i1, recs in records.chunks():
            project(recs, projector, out=out[i0:i1])
            del recs  # released before the next chunk is computed
        return out
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
    if isinstance(records, DeferredRecords):
        return records.n, records.m
    r0 = records[0]
    return (r0.d.shape[0], r0.d.shape[2]) if isinstance(r0, KronRecord) else tuple(r0.g.shape[:2])


def _dense_cheaper(r):
    # decided from the layer's shape alone (never from k or the cache state), so that every
    # projection size and every extension of a nested projection uses the same kind of rows
    L, d_in, d_out, m = r.L, r.d_in, r.d.shape[-1], r.d.shape[2]
    p = d_in * d_out
    return L > 1 and p <= _HYBRID_MAX_P and m * p <= 4 * L * (d_in + m * d_out)


def flatten(records):
    """Per-example gradients (n, m, p), parameters in the order of ``named_parameters()``
    (weight before bias; a tied Parameter once, where it first appears)."""
    if isinstance(records, DeferredRecords):
        parts = []
        for _, _, r in records.chunks():
            parts.append(flatten(r))
            del r  # released before the next chunk is computed
        return torch.cat(parts)
    parts = []
    for r in records:
        g = r.dense()
        if isinstance(r, KronRecord):
            g = _kron_to_param_order(g.reshape(*g.shape[:2], r.d.shape[-1], r.d_in), r.key)
        parts.append(g)
    return torch.cat(parts, dim=-1)
