"""The one featuriser: (model, X, y, output, projector) -> rows of features.

Every kernel and attributor that needs per-example gradients gets them here: the records of
:func:`skattr.gradients.compute_records` (structured Linear / Conv factors, dense blocks) are
either flattened (exact features) or projected by a :class:`skattr.projection.Projector`, batch by
batch, straight into the caller's output rows (an in-memory store's arrays, or a buffer that is
then written to an on-disk store).  The model-output function (:mod:`skattr.outputs`) says what is
differentiated; its reweighting term ``Q`` comes from the same forward pass.

:class:`Featurizer` holds one model's settings (output, projection, seed, gradient engine);
:func:`encode_targets` turns labels (or, without labels, the models' own predictions) into the
targets the output function takes; :data:`PROJECTORS` shares drawn projections across fits.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch

from . import gradients as _grad
from .projection import Projector

__all__ = ["Featurizer", "ProjectorCache", "PROJECTORS", "encode_targets", "projection_seed", "progress"]


def progress(iterable, total, verbose, desc):
    """``iterable`` with a tqdm progress bar when ``verbose``."""
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


class ProjectorCache:
    """The last few projectors used, keyed by everything that determines them (thread-safe).

    Projections are deterministic in their key, so grid searches, ensembles and refits share
    them instead of drawing the same random factors again; dense rows can be large, so only
    ``maxsize`` are kept.
    """

    def __init__(self, maxsize=2):
        self.maxsize = maxsize
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind, k, seed, *, device, dtype, key=()):
        full = (kind, int(k), int(seed), str(device), str(dtype), key)
        with self._lock:
            proj = self._items.get(full)
            if proj is None:
                proj = Projector(kind, int(k), int(seed), device=device, dtype=dtype)
                self._items[full] = proj
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(full)
            return proj

    def clear(self):
        with self._lock:
            self._items.clear()


PROJECTORS = ProjectorCache()


def projection_seed(seed, j):
    """Seed of the projection of ensemble member (or checkpoint) ``j``: independent across
    members, so projection noise averages out over an ensemble instead of being shared by
    every member; member 0 uses ``seed`` itself."""
    if j == 0:
        return int(seed)
    return int(np.random.SeedSequence(int(seed), spawn_key=(j, 1)).generate_state(1, np.uint64)[0] >> 1)


class Featurizer:
    """Features of one model: ``phi(z) = P grad_theta f(z) / sqrt(k)`` and ``Q(z)`` per example.

    Parameters
    ----------
    model : TorchModel
        The network (fitted or wrapped).
    output : ModelOutput
        What is differentiated (checked against ``model`` by the caller).
    projection_dim : int or None
        ``k``; ``None`` gives the exact per-example gradients (``n_params`` columns).
    projection : str
        Projection kind (:data:`skattr.projection.KINDS`).
    seed : int
        Seed of the projection.
    method : {"auto", "structured", "vmap"}
        Gradient engine.
    batch_size : int or None
        Examples per gradient batch (default: the model's ``batch_size_eval``).
    cache : ProjectorCache
    """

    def __init__(self, model, output, *, projection_dim, projection, seed, method="auto",
                 batch_size=None, cache=PROJECTORS):
        self.model = model
        self.output = output
        self.projection_dim = projection_dim
        self.projection = projection
        self.seed = int(seed)
        self.method = method
        self.batch_size = int(batch_size or model.batch_size_eval)
        self.cache = cache
        self.net = output.network(model.network())
        self.info = {}  # the gradient engine's report of the last batch

    # a featurizer sent to a worker (joblib, Dask) uses that process's projector cache
    def __getstate__(self):
        state = dict(self.__dict__)
        state["cache"] = None if self.cache is PROJECTORS else self.cache
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.cache is None:
            self.cache = PROJECTORS

    def records(self, xb, yb, outputs=None, **plan):
        """Gradient records of the output for one batch (``outputs`` receives the logits;
        :attr:`info` which engine ran and why; ``plan``: ``reserved=`` bytes and the
        ``projector=``, counted against the memory budget)."""
        m = self.model
        return _grad.compute_records(
            self.net, xb, output=self.output, y=yb, loss=m.loss_fn,
            prefixes=self.output.prefixes(m.prefixes_), method=self.method, outputs=outputs,
            info=self.info, **plan,
        )

    def projector(self):
        if self.projection_dim is None:
            return None
        m = self.model
        shapes = tuple((n, tuple(p.shape)) for n, p in m.network().named_parameters())
        return self.cache.get(
            self.projection, self.projection_dim, self.seed, device=m.device_,
            dtype=m.torch_dtype_, key=(type(self.output).__name__, shapes),
        )

    def dim(self, X, y_enc):
        """Feature dimension: ``projection_dim``, or the number of parameters differentiated."""
        if self.projection_dim is not None:
            return int(self.projection_dim)
        xb = self.model.to_tensor(X[:1])
        yb = None if y_enc is None else y_enc[:1]
        return int(sum(r.n_params for r in self.records(xb, yb)))

    def rows(self, X, y_enc, r0, r1, out=None, *, dim=None):
        """Features (rows, dim) and Q (rows,) of rows ``r0:r1`` of ``X``.

        ``y_enc`` are the encoded targets of all of ``X`` (or None).  ``out``: optional
        ``(F, q)`` arrays of those shapes (e.g. an in-memory store's rows), written in place
        batch by batch instead of gathered and copied.
        """
        member = self.model
        rows = r1 - r0
        k = int(dim if dim is not None else self.dim(X, y_enc))
        if out is None:
            out = (np.empty((rows, k), dtype=member.dtype), np.empty(rows, dtype=member.dtype))
        F_out, q_out = out
        # on the CPU the projection accumulates straight into the output rows
        Ft = torch.from_numpy(F_out) if member.device_.type == "cpu" else None
        proj = self.projector()
        scale = 1.0 / math.sqrt(k)
        bs = self.batch_size
        Xt = member.to_tensor(X[r0:r1])  # validated and converted once
        for i0 in range(r0, r1, bs):
            i1 = min(r1, i0 + bs)
            xb = Xt[i0 - r0 : i1 - r0]
            yb = None if y_enc is None else y_enc[i0:i1]
            outs = {}
            recs = self.records(xb, yb, outputs=outs, projector=proj,
                                reserved=F_out.nbytes)
            # into the output rows themselves on the CPU, else through a device buffer
            o = Ft[i0 - r0 : i1 - r0] if Ft is not None else torch.empty(
                i1 - i0, k, dtype=member.torch_dtype_, device=member.device_)
            featurize_batches([(0, i1 - i0, recs)], proj, o[:, None, :])
            if proj is not None:
                o.mul_(scale)
            if Ft is None:
                F_out[i0 - r0 : i1 - r0] = o.cpu().numpy()
            with torch.no_grad():
                z = outs["logits"]  # from the gradients' own forward pass
                q = self.output.q(z, yb if yb is not None else torch.zeros(
                    len(xb), dtype=torch.long, device=z.device))
            q_out[i0 - r0 : i1 - r0] = q.detach().cpu().numpy()
        return F_out, q_out

    def dense_batches(self, X, y_enc):
        """Yield ``(i0, records)`` of the exact per-example gradient records, batch by batch
        (for preconditioners that act in parameter space before projecting)."""
        Xt = self.model.to_tensor(X)
        for i0 in range(0, Xt.shape[0], self.batch_size):
            i1 = min(Xt.shape[0], i0 + self.batch_size)
            yb = None if y_enc is None else y_enc[i0:i1]
            yield i0, self.records(Xt[i0:i1], yb)


def featurize_batches(batches, projector, out=None, *, n=None):
    """The featurisation loop every kernel and attributor runs: the records of each batch,
    ``(i0, i1, records)``, projected by ``projector`` (or flattened when it is None) into
    ``out[i0:i1]``, an (n, m, k) tensor (allocated at the first batch, ``n`` rows, when
    ``out`` is None and there is a projector).  Projections accumulate, so rows are zeroed."""
    for i0, i1, recs in batches:
        if out is None:
            m = _grad.records_shape(recs)[1]
            out = torch.empty(n, m, projector.k, device=projector.device, dtype=projector.dtype)
        o = out[i0:i1]
        if projector is None:
            if not isinstance(recs, list):  # deferred or chunked records: the general path
                o.copy_(_grad.flatten(recs))
            elif o.shape[1] == 1:
                write_flat(recs, o[:, 0])
            else:
                for j in range(o.shape[1]):  # output by output: no (rows, m, p) temporary
                    write_flat(output_records(recs, j), o[:, j])
        else:
            o.zero_()
            _grad.project(recs, projector, out=o)
    return out


def output_records(records, j):
    """The records of output ``j`` alone (views)."""
    return [_grad.KronRecord(r.key, r.x, r.d[:, :, j : j + 1], bias=r.bias)
            if isinstance(r, _grad.KronRecord) else _grad.DenseRecord(r.key, r.g[:, j : j + 1])
            for r in records]


def write_flat(records, out):
    """Write the per-example gradients of one scalar output into ``out`` (n, p) in the
    parameter order of :func:`skattr.gradients.flatten`, each layer straight into its columns
    (no concatenated temporary: for exact features the copies are the cost)."""
    if not isinstance(records, list):  # deferred or chunked records: the general path
        out.copy_(_grad.flatten(records)[:, 0])
        return out
    n, c = out.shape[0], 0
    for r in records:
        p = r.n_params
        if isinstance(r, _grad.KronRecord) and r.L == 1 and r.d.shape[2] == 1:
            d_out, d_x = r.d.shape[-1], r.x.shape[-1]
            W = out[:, c : c + d_out * d_x].view(n, d_out, d_x)
            torch.mul(r.d[:, 0, 0, :, None], r.x[:, 0, None, :], out=W)
            if r.bias:
                out[:, c + d_out * d_x : c + p] = r.d[:, 0, 0]
        else:
            out[:, c : c + p] = _grad.flatten([r])[:, 0]  # the general layout, one record
        c += p
    if c != out.shape[1]:
        raise RuntimeError(f"The gradient records hold {c} parameters, the output {out.shape[1]}.")
    return out


def encode_targets(models, output, X, y, batch_size=None):
    """Encoded targets per model for ``(X, y)``; ``y=None``: the models' own (averaged)
    predictions under ``output``."""
    n = X.shape[0]
    if y is not None:
        return [output.encode_y(m, y, n) for m in models]
    zs = []
    for m in models:
        net = output.network(m.network())
        Xt = m.to_tensor(X)
        bs = int(batch_size or m.batch_size_eval)
        with torch.no_grad():
            parts = []
            for i in range(0, n, bs):
                z = net(Xt[i : i + bs])
                parts.append(z[:, None] if z.ndim == 1 else z)
        zs.append(torch.cat(parts))
    yt = output.predict_y(models[0], zs)
    return [yt.to(m.device_) for m in models]
