"""Recording the per-example decomposition of training (Pfahler and Morik, 2021).

Under plain SGD every Linear / Conv layer's weight decomposes exactly over steps ``t`` and
the examples ``i`` of each mini-batch ``B_t``:

    W_T = W_0 + sum_t sum_{i in B_t} dW_{t,i},     dW_{t,i} = -(eta_t / B) delta_{t,i} a_{t,i}^T,

``a`` the layer input (for a convolution its unfolded patches, one row per output position)
and ``delta`` the gradient of the example's loss at the layer output.  The trainer's loss is the
batch mean, so the gradient a hook sees at the layer output already carries the ``1 / B``.

:class:`RepresentationRecorder` is a :class:`~skattr.training.Callback` that hooks the traced
layers during the training forward / backward pass itself (no extra pass) and keeps, per
recorded step and layer, one :class:`StepRecord`:

* ``"factors"``: ``U = a`` (B, L, d_in [+1]) and ``V = -eta * scale * grad_out`` (B, L, d_out),
  so that ``dW_{t,i} = sum_s V[i, s] U[i, s]^T``; either side may be randomly projected
  (``projection_dim``), which keeps inner products unbiased but loses the exact sum;
* ``"dense"``: the per-example update ``D = einsum(V, U)`` (B, d_out, d_in [+1]) when it is
  smaller than the factors (small convolutions with many positions);
* ``"batch"``: ``record="updates"``, the whole update ``W_{t+1} - W_t`` (1, d_out, d_in [+1])
  of any optimizer, shared by the batch.

A bias is folded in as a last input column of ones (``bias="append"``), so it decomposes
exactly too; ``bias="exclude"`` leaves it out (its change is then unexplained).

With ``store=<folder>`` the per-example records go to an on-disk
:class:`~skattr.store.FeatureStore` per layer instead of memory: one row per (step, example) slot
(``batch_size`` slots per step, unused ones marked with index -1), the flattened factors (or
per-example update) as the row and the training example's index as the row's scalar, a block of
several steps at a time.  Only the steps of the block being filled are held in memory.  Training is
seeded, so a run that was interrupted is resumed by fitting again with the same folder: the steps
of finished blocks are trained through without recording, the rest are recorded and written.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import LayerCapture
from .training import Callback

_STORE_BLOCK_BYTES = 8 * 2**20  # target size of one on-disk block of records (several steps)

__all__ = ["ClasswiseBatches", "RepresentationRecorder", "StepRecord", "TRACEABLE", "layer_dims", "layer_input",
           "traceable_layers"]

TRACEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _untraceable_reason(mod):
    if not isinstance(mod, TRACEABLE):
        return (f"{type(mod).__name__} is not a Linear, Conv1d or Conv2d layer (only those "
                "decompose into per-example low-rank updates)")
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if mod.groups != 1:
            return f"{type(mod).__name__} with groups={mod.groups} (only groups=1 is traced)"
        if mod.padding_mode != "zeros":
            return f"{type(mod).__name__} with padding_mode={mod.padding_mode!r} (only 'zeros')"
        if isinstance(mod.padding, str):
            return f"{type(mod).__name__} with padding={mod.padding!r} (give integer padding)"
    if not mod.weight.requires_grad:
        return f"{type(mod).__name__} has a frozen weight (requires_grad=False)"
    return None


def traceable_layers(module, layers=None):
    """Names of the traced layers of ``module``: ``layers`` (validated) or every traceable one.

    Raises ``ValueError`` for a name that is missing or names an untraceable layer.
    """
    mods = dict(module.named_modules())
    if layers is None:
        names = [n for n, m in mods.items() if n and _untraceable_reason(m) is None]
        if not names and _untraceable_reason(module) is None:
            names = [""]
        if not names:
            raise ValueError(
                f"The network {type(module).__name__} has no traceable layer (Linear, Conv1d or "
                "Conv2d with groups=1 and a trainable weight)."
            )
        return names
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is an empty list; pass None to trace every Linear/Conv layer.")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"layers must hold module names (str), got {type(n).__name__}.")
        if n not in mods:
            avail = [k for k, m in mods.items() if k and isinstance(m, TRACEABLE)]
            raise ValueError(f"No submodule named {n!r}; traceable layers: {avail[:20]}.")
        why = _untraceable_reason(mods[n])
        if why is not None:
            raise ValueError(f"Layer {n!r} cannot be traced: {why}.")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a layer twice: {names}.")
    return names


def layer_dims(mod, bias=True):
    """``(d_out, d_in)`` of the layer's weight as a matrix (``d_in`` + 1 with a folded bias)."""
    d_out = mod.weight.shape[0]
    d_in = int(np.prod(mod.weight.shape[1:]))
    return d_out, d_in + int(bias and mod.bias is not None)


def layer_input(mod, x, bias):
    """The layer input as rows (n, L, d_in [+1]): Linear inputs flattened over leading axes,
    Conv inputs unfolded to patches (one row per output position)."""
    if isinstance(mod, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        if isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(2)
            ks, dil, pad, st = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
        else:
            ks, dil, pad, st = mod.kernel_size, mod.dilation, mod.padding, mod.stride
        a = F.unfold(x, ks, dilation=dil, padding=pad, stride=st).transpose(1, 2)
    if bias and mod.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def layer_output(mod, z):
    """The layer output as rows (n, L, d_out), in the order of :func:`layer_input`."""
    if isinstance(mod, nn.Linear):
        return z.reshape(z.shape[0], -1, z.shape[-1])
    return z.flatten(2).transpose(1, 2)


def layer_weight(mod, bias):
    """The weight as a (d_out, d_in [+1]) matrix (bias as the last column when folded)."""
    W = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    if bias and mod.bias is not None:
        W = torch.cat([W, mod.bias.detach()[:, None]], dim=1)
    return W


class StepRecord:
    """What one step left in one layer (see the module docstring for ``kind``).

    Attributes
    ----------
    step : int
        The training step (0-based).
    lr : float
    index : ndarray of int, (B,)
        The training examples of the batch.
    kind : {"factors", "dense", "batch"}
    U, V : tensors (B, L, k_in), (B, L, k_out) for ``"factors"``
    D : tensor (B, d_out, d_in) for ``"dense"``, (1, d_out, d_in) for ``"batch"``
    """

    __slots__ = ("step", "lr", "index", "kind", "U", "V", "D")

    def __init__(self, step, lr, index, kind, U=None, V=None, D=None):
        self.step, self.lr, self.index, self.kind = int(step), float(lr), np.asarray(index), kind
        self.U, self.V, self.D = U, V, D

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.U, self.V, self.D) if t is not None)

    def update(self):
        """The per-example updates ``dW_{t,i}`` (B, d_out, d_in) (exact factors only)."""
        if self.kind == "factors":
            return torch.einsum("bld,blk->bdk", self.V, self.U)
        return self.D


class ClasswiseBatches(Callback):
    """The paper's mini-batch variant: single-class batches plus "ghost" examples.

    Each epoch, every class's examples are shuffled and cut into batches of
    ``batch_size - ghost`` (the last of a class may be smaller), the batches are shuffled, and
    each gets ``ghost`` examples drawn with replacement from the whole training set (so classes
    by their prior) that enter the forward pass (batch-norm statistics) with loss weight 0:
    the step's loss is the mean over the single-class part, so without batch norm each update
    belongs to one class.  Randomness comes from the trainer's seeded generator.

    Parameters
    ----------
    labels : array-like of shape (n_train,)
        The training labels, in the order of the training data.
    batch_size : int
        Examples per step, ghosts included.
    ghost : int, default=0
        Ghost examples per step (``0 <= ghost < batch_size``).

    Attributes
    ----------
    n_batches_ : int
        Steps per epoch.
    """

    def __init__(self, labels, batch_size, ghost=0):
        self.labels = labels
        self.batch_size = batch_size
        self.ghost = ghost

    def _check(self, n):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"ClasswiseBatches has {labels.size} labels for {n} training examples.")
        B, g = int(self.batch_size), int(self.ghost)
        if not 0 <= g < B:
            raise ValueError(f"ghost must be in [0, batch_size={B}), got {g}.")
        return labels, B - g, g

    def plan_epoch(self, state, generator):
        labels, m, g = self._check(state.n_train)
        chunks = []
        for c in np.unique(labels):
            members = torch.as_tensor(np.flatnonzero(labels == c))
            members = members[torch.randperm(len(members), generator=generator)]
            chunks += list(members.split(m))
        order = torch.randperm(len(chunks), generator=generator)
        plan = []
        for k in order.tolist():
            ghosts = torch.randint(state.n_train, (g,), generator=generator)
            w = torch.cat([torch.ones(len(chunks[k]), dtype=torch.float64), torch.zeros(g, dtype=torch.float64)])
            plan.append((torch.cat([chunks[k], ghosts]), w))
        self.n_batches_ = len(plan)
        return plan


def _gaussian(seed, rows, cols, device, dtype):
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    M = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return (M / math.sqrt(cols)).to(device=device, dtype=dtype)


class RepresentationRecorder(Callback):
    """Record the per-example factors of every traced layer's update during training.

    Parameters
    ----------
    layers : list of str or None
        Names of the traced layers (``None``: every Linear / Conv1d / Conv2d layer).
    record : {"factors", "updates"}, default="factors"
        ``"factors"``: per-example low-rank factors (plain SGD);
        ``"updates"``: the whole step update ``W_{t+1} - W_t`` (any optimizer), shared by the batch.
    projection_dim : int or None
        Project each side of the factors that is wider than this with a seeded Gaussian
        matrix (scaled so inner products stay unbiased).
    step_every : int, default=1
        Record one step in ``step_every``; the recorded updates are multiplied by
        ``step_every`` so their sum estimates the whole.
    bias : {"append", "exclude"}, default="append"
    seed : int, default=0
        Seed of the projections.
    store : str, path-like or None, default=None
        Folder of the on-disk record stores (``record="factors"`` only); ``None`` keeps the
        records in memory.
    store_config : dict or None, default=None
        A JSON-serialisable description of the run (data, model, settings); with the layer
        name it keys each layer's store folder, so a resumed run finds its records and another
        run never shares them.

    Attributes
    ----------
    layers_ : list of str
    records_ : dict {layer: list of StepRecord}
        In memory (empty lists with ``store``).
    stores_ : dict {layer: FeatureStore}
        With ``store``: the on-disk records (read them with :meth:`stored_chunks`).
    recorded_steps_ : list of int
        The recorded training steps.
    initial_ : dict {layer: tensor (d_out, d_in [+1])}
        ``W_0`` (bias folded).
    projections_ : dict {layer: (P_out or None, P_in or None)}
        The projection matrices (d, k) of each side.
    lrs_ : list of float, one per training step
    n_steps_ : int
    momentum_, weight_decay_ : float
        The optimizer's settings.
    """

    def __init__(self, layers=None, record="factors", projection_dim=None, step_every=1,
                 bias="append", seed=0, store=None, store_config=None):
        self.layers = layers
        self.record = record
        self.projection_dim = projection_dim
        self.step_every = step_every
        self.bias = bias
        self.seed = seed
        self.store = store
        self.store_config = store_config

    # ------------------------------------------------------------------ training hooks
    def on_train_begin(self, state):
        net = state.module
        self.layers_ = traceable_layers(net, self.layers)
        mods = dict(net.named_modules())
        self._mods = [mods[n] for n in self.layers_]
        # the clone of each output goes on through the network (an in-place activation
        # modifies it, not the tensor whose gradient is hooked)
        self._capture = LayerCapture(dict(zip(self.layers_, self._mods)), clone_output=True)
        group = state.optimizer.param_groups[0]
        self.momentum_ = float(group.get("momentum", 0.0) or 0.0)
        self.weight_decay_ = float(group.get("weight_decay", 0.0) or 0.0)
        fold = self.bias == "append"
        self.initial_ = {n: layer_weight(m, fold).clone() for n, m in zip(self.layers_, self._mods)}
        self.records_ = {n: [] for n in self.layers_}
        self.projections_ = {}
        self.kinds_ = {}
        k = self.projection_dim
        for j, (n, m) in enumerate(zip(self.layers_, self._mods)):
            d_out, d_in = layer_dims(m, fold)
            w = m.weight
            P_out = _gaussian(self.seed * 1000003 + 2 * j, d_out, k, w.device, w.dtype) if k and d_out > k else None
            P_in = _gaussian(self.seed * 1000003 + 2 * j + 1, d_in, k, w.device, w.dtype) if k and d_in > k else None
            self.projections_[n] = (P_out, P_in)
        self.lrs_ = []
        self.n_steps_ = 0
        self.recorded_steps_ = []
        if self.store is not None and self.record != "factors":
            raise ValueError("store= holds per-example records (record='factors'); record='updates' "
                             "keeps its one matrix per step in memory.")
        self.stores_, self._layout, self._pending, self._skipping = {}, {}, {}, False

    def _recording(self, step):
        return step % int(self.step_every) == 0

    def on_batch_begin(self, state):
        if not self._recording(state.step):
            return
        self._skipping = self._stored(state.step)
        if self._skipping:  # resumed run: this step's block is already on disk
            return
        if self.record == "updates":
            fold = self.bias == "append"
            self._before = [layer_weight(m, fold).clone() for m in self._mods]
            return
        self._capture.install().begin()  # hooked during recorded steps only

    def _remove_hooks(self):
        if getattr(self, "_capture", None) is not None:
            self._capture.remove()

    def on_batch_end(self, state):
        self.lrs_.append(float(state.lr))
        self.n_steps_ = state.step
        step = state.step - 1
        if not self._recording(step):
            return
        self.recorded_steps_.append(step)
        if self._skipping:
            return
        scale = float(self.step_every)
        fold = self.bias == "append"
        idx = np.asarray(state.batch_indices).copy()
        if self.record == "updates":
            if state.batch_weights is not None:  # ghosts (loss weight 0) get no share of the update
                idx = idx[np.asarray(state.batch_weights) > 0]
            for n, m, W0 in zip(self.layers_, self._mods, self._before):
                D = (layer_weight(m, fold) - W0) * scale
                self.records_[n].append(StepRecord(step, state.lr, idx, "batch", D=D[None]))
            self._before = None
            return
        calls = self._capture.end()
        self._remove_hooks()
        for n, m in zip(self.layers_, self._mods):
            if any(c.grad is None for c in calls[n]):
                raise RuntimeError(
                    f"RepresentationTracer: layer {n!r} got no output gradient in step {step} "
                    "(is its output used in the loss?)."
                )
            # several calls of one layer in a forward pass are more positions of its update
            U = torch.cat([layer_input(m, c.input, fold) for c in calls[n]], dim=1)
            V = torch.cat([layer_output(m, c.grad) for c in calls[n]], dim=1).mul(-float(state.lr) * scale)
            rec = self._make_record(n, step, state.lr, idx, U, V)
            if self.store is None:
                self.records_[n].append(rec)
            else:
                self._to_store(n, rec, state)

    def _make_record(self, name, step, lr, idx, U, V):
        L, d_in, d_out = U.shape[1], U.shape[2], V.shape[2]
        kind = self.kinds_.get(name)
        if kind is None:
            P_out, P_in = self.projections_[name]
            k_out = d_out if P_out is None else P_out.shape[1]
            k_in = d_in if P_in is None else P_in.shape[1]
            factored = L * (k_in + k_out) <= d_out * d_in or self.projection_dim is not None
            kind = self.kinds_[name] = "factors" if factored else "dense"
        if kind == "dense":
            return StepRecord(step, lr, idx, "dense", D=torch.einsum("bld,blk->bdk", V, U))
        P_out, P_in = self.projections_[name]
        if P_out is not None:
            V = V @ P_out
        if P_in is not None:
            U = U @ P_in
        return StepRecord(step, lr, idx, "factors", U=U.contiguous(), V=V.contiguous())

    # ------------------------------------------------------------------ on-disk records
    def _open_store(self, name, rec, state):
        from .store import FeatureStore

        n_rec = -(-int(state.total_steps) // int(self.step_every))
        B = int(state.batch_size)
        if rec.kind == "factors":
            L, k_in, k_out = rec.U.shape[1], rec.U.shape[2], rec.V.shape[2]
            width, shape = L * (k_in + k_out), (L, k_in, k_out)
        else:
            width, shape = rec.D.shape[1] * rec.D.shape[2], tuple(rec.D.shape[1:])
        dtype = str(rec.U.dtype if rec.kind == "factors" else rec.D.dtype).replace("torch.", "")
        if dtype == "float32" and state.n_train > 2**24:
            raise ValueError(f"store= with float32 records keeps example indices exactly up to 2**24, "
                             f"not {state.n_train} examples; train in float64.")
        G = max(1, _STORE_BLOCK_BYTES // (B * width * np.dtype(dtype).itemsize))
        meta = {**(self.store_config or {}), "layer": name, "kind": rec.kind, "shape": list(shape),
                "steps_per_block": G, "slots_per_step": B, "step_every": int(self.step_every)}
        self.stores_[name] = FeatureStore.for_config(
            self.store, meta, n_rows=n_rec * B, dim=width, n_models=1, block_size=G * B, dtype=dtype)
        self._layout[name] = {"kind": rec.kind, "shape": shape, "G": G, "B": B, "n_rec": n_rec}
        self._pending[name] = []
        # verify the finished blocks once, before any step is skipped as stored: a damaged one
        # loses its marker here (with a warning), so its steps are recorded again in full
        self.stores_[name].missing()

    def _block_of(self, step, name):
        j = step // int(self.step_every)
        return j // self._layout[name]["G"], j

    def _stored(self, step):
        """Whether every layer's block of ``step`` is finished on disk (a resumed run)."""
        if self.store is None or len(self._layout) < len(self.layers_):
            return False
        return all(st.done(0, self._block_of(step, n)[0], verify=False) for n, st in self.stores_.items())

    def _to_store(self, name, rec, state):
        if name not in self.stores_:
            self._open_store(name, rec, state)
        lay = self._layout[name]
        if len(rec.index) > lay["B"]:
            raise ValueError(f"A batch of {len(rec.index)} examples exceeds the model's batch_size="
                             f"{lay['B']} slots per step of the record store.")
        b, j = self._block_of(rec.step, name)
        pend = self._pending[name]
        if pend and pend[-1][0] // lay["G"] != b:  # left over from a block finished on disk
            self._flush(name, pend[-1][0] // lay["G"])
        self._pending[name].append((j, rec))
        if (j + 1) % lay["G"] == 0 or j + 1 == lay["n_rec"]:
            self._flush(name, b)

    def _flush(self, name, b):
        st, lay, pend = self.stores_[name], self._layout[name], self._pending[name]
        self._pending[name] = []
        if st.done(0, b):  # written by the interrupted run (its first step is always re-recorded)
            return
        r0, r1 = st.block_range(b)
        F = np.zeros((r1 - r0, st.dim), dtype=st.dtype)
        q = np.full(r1 - r0, -1.0)
        for j, rec in pend:
            s0 = j * lay["B"] - r0
            rows = (torch.cat([rec.U.flatten(1), rec.V.flatten(1)], 1) if rec.kind == "factors"
                    else rec.D.flatten(1))
            F[s0:s0 + len(rec.index)] = rows.detach().cpu().numpy()
            q[s0:s0 + len(rec.index)] = rec.index
        st.write(0, b, F, q)

    def stored_chunks(self, name, device=None, dtype=None):
        """Yield the on-disk records of one layer block by block: ``(kind, index, step, tensors)``
        with ``tensors`` ``(U, V)`` (rows, L, k) or ``(D,)`` (rows, d_out, d_in)."""
        st, lay = self.stores_[name], self._layout[name]
        for b in range(st.n_blocks):
            F, q = st.read(0, b)
            q = np.asarray(q)
            keep = np.flatnonzero(q >= 0)
            r0 = st.block_range(b)[0]
            step = (r0 + keep) // lay["B"] * int(self.step_every)
            T = torch.from_numpy(np.array(F[keep])).to(device=device, dtype=dtype)
            if lay["kind"] == "factors":
                L, k_in, k_out = lay["shape"]
                tensors = (T[:, :L * k_in].reshape(-1, L, k_in), T[:, L * k_in:].reshape(-1, L, k_out))
            else:
                tensors = (T.reshape(-1, *lay["shape"]),)
            yield lay["kind"], q[keep].astype(np.int64), step, tensors

    def on_train_end(self, state):
        for name, pend in self._pending.items():  # a last, partial block (normally flushed already)
            if pend:
                self._flush(name, pend[0][0] // self._layout[name]["G"])
        self._remove_hooks()
        self._capture, self._mods, self._before = None, None, None

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_mods", None)
        d.pop("_capture", None)
        d.pop("_before", None)
        return d

    def nbytes(self):
        """Bytes held by the records (on disk with ``store``)."""
        return (sum(r.nbytes() for recs in self.records_.values() for r in recs)
                + sum(st.nbytes() for st in self.stores_.values()))
