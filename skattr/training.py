"""A small deterministic SGD trainer that can record its trajectory through callbacks.

The update is PyTorch's SGD (``g = grad + weight_decay * theta``; ``buf = momentum * buf + g``;
``theta -= lr * buf``), which is the recursion HYDRA and TracIn replay.  Batch order comes from a
seeded ``torch.Generator``, so the same ``random_state`` gives the same trajectory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Callback", "TrainState", "TrajectoryRecorder", "train_module"]


@dataclass
class TrainState:
    """What a callback sees: the live module and optimizer and where training stands."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    batch_indices: np.ndarray | None = None
    batch_weights: np.ndarray | None = None
    lr: float = 0.0
    loss: float = float("nan")
    n_train: int = 0
    batch_size: int = 0
    total_steps: int = 0
    extra: dict = field(default_factory=dict)


class Callback:
    """Base class: override any of the hooks. Each receives a :class:`TrainState`.

    ``on_batch_begin`` runs before the parameter update of a step (parameters are ``theta_t``),
    ``on_batch_end`` after it (parameters are ``theta_{t+1}``).  ``plan_epoch`` lets one callback
    choose the batches: it returns ``None`` (the trainer's seeded shuffle) or the epoch's batches,
    each an index array or a pair ``(indices, loss_weights)``; the step's loss is then
    ``sum_i w_i loss_i / sum_i w_i`` (weight 0: the example enters the forward pass, e.g. batch-norm
    statistics, but not the loss) and ``state.batch_weights`` holds the weights.  The number of
    steps of every epoch is that of the first (it sets the learning-rate schedule's length).
    """

    def plan_epoch(self, state, generator):
        return None

    def on_train_begin(self, state):
        pass

    def on_batch_begin(self, state):
        pass

    def on_batch_end(self, state):
        pass

    def on_epoch_end(self, state):
        pass

    def on_train_end(self, state):
        pass


class TrajectoryRecorder(Callback):
    """Record checkpoints, learning rates, batch order and losses.

    Parameters
    ----------
    checkpoint_every : "epoch" or int, default="epoch"
        Save a copy of the parameters at the start of training, then after every epoch (or every
        ``checkpoint_every`` steps).

    Attributes
    ----------
    checkpoints_ : list of (step, state_dict)
    checkpoint_lrs_ : list of float
        The learning rate of the step before each checkpoint (the first step's for the
        initial checkpoint): TracIn's ``eta`` of that checkpoint.
    optimizer_states_ : list of dict
        The optimizer's ``state_dict()`` at each checkpoint (momentum buffers included),
        copied to the CPU.
    lrs_ : list of float, one per step
    batches_ : list of ndarray, the training indices of each step
    batch_weights_ : list of (ndarray or None), one per step
        The loss weights of each step's examples when a callback's ``plan_epoch`` gave
        weighted batches (the step's loss is then ``sum_j w_j l_j / sum_j w_j``); ``None`` for an
        unweighted step (the mean).  A replay needs them to reproduce the run.
    losses_ : list of float, the (weighted) mean mini-batch loss of each step
    optimizer_ : str
        The optimizer's class name (``"SGD"`` for :func:`train_module`).
    momentum_, weight_decay_ : float or None
        The optimizer's settings (``None`` when its parameter group has no such key, e.g. Adam's
        has no ``momentum``; HYDRA's replay then refuses the recording).
    n_train_, batch_size_ : int
    """

    def __init__(self, checkpoint_every="epoch"):
        self.checkpoint_every = checkpoint_every

    def _save(self, state):
        sd = {k: v.detach().to("cpu", copy=True) for k, v in state.module.state_dict().items()}
        self.checkpoints_.append((state.step, sd))
        self.checkpoint_lrs_.append(state.lr if state.step > 0 else None)  # step 0: set below
        self.optimizer_states_.append(_to_cpu(state.optimizer.state_dict()))

    def on_train_begin(self, state):
        self.checkpoints_, self.lrs_, self.batches_, self.losses_ = [], [], [], []
        self.checkpoint_lrs_, self.optimizer_states_, self.batch_weights_ = [], [], []
        group = state.optimizer.param_groups[0]
        self.optimizer_ = type(state.optimizer).__name__
        self.momentum_, self.weight_decay_ = group.get("momentum"), group.get("weight_decay")
        self.n_train_, self.batch_size_ = state.n_train, state.batch_size
        self._save(state)

    def on_batch_end(self, state):
        self.lrs_.append(state.lr)
        if self.checkpoint_lrs_ and self.checkpoint_lrs_[0] is None:
            self.checkpoint_lrs_[0] = state.lr
        self.batches_.append(np.asarray(state.batch_indices))
        w = state.batch_weights
        self.batch_weights_.append(None if w is None else np.array(w, dtype=np.float64))
        self.losses_.append(state.loss)
        ce = self.checkpoint_every
        if ce != "epoch" and state.step % int(ce) == 0:
            self._save(state)

    def on_epoch_end(self, state):
        if self.checkpoint_every == "epoch":
            self._save(state)


    def tracin_checkpoints(self, include_initial=False):
        """``[(state_dict, learning_rate), ...]`` for :class:`skattr.estimators.TracIn`
        (the checkpoints after the initial one, unless ``include_initial``)."""
        pairs = [(sd, lr) for (_, sd), lr in zip(self.checkpoints_, self.checkpoint_lrs_)]
        return pairs if include_initial else pairs[1:]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _lr_at(lr, schedule, step, total):
    if schedule in (None, "constant"):
        return lr
    if schedule == "linear":
        return lr * (1.0 - step / max(total, 1))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + np.cos(np.pi * step / max(total, 1)))
    if callable(schedule):
        return float(schedule(step, total))
    raise ValueError(f"lr_schedule must be None, 'linear', 'cosine' or a callable, got {schedule!r}.")


def learning_rate_at(lr, schedule, step, total):
    """The learning rate :func:`train_module` uses at step ``step`` of ``total`` (from 0), for a
    peak ``lr`` and an ``lr_schedule`` (None / "constant", "linear", "cosine" or a callable
    ``schedule(step, total)``)."""
    return _lr_at(lr, schedule, step, total)


__all__ += ["learning_rate_at"]


def train_module(
    module,
    X,
    y,
    loss_fn,
    *,
    epochs,
    batch_size,
    lr,
    momentum,
    weight_decay,
    lr_schedule,
    seed,
    callbacks=(),
    verbose=0,
):
    """Train ``module`` in place on tensors ``X``, ``y`` with seeded mini-batch SGD.

    ``loss_fn(logits, y)`` returns per-example losses.  Returns the list of mean losses per epoch.
    """
    n = X.shape[0]
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    state = TrainState(module=module, optimizer=opt, n_train=n, batch_size=batch_size, total_steps=total)
    for cb in callbacks:
        cb.on_train_begin(state)
    history = []
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="training", leave=False)
    planners = [cb for cb in callbacks if type(cb).plan_epoch is not Callback.plan_epoch]
    if len(planners) > 1:
        raise ValueError(f"Only one callback may plan the batches, got {[type(c).__name__ for c in planners]}.")
    for epoch in range(epochs):
        module.train()
        plan = _planned(planners[0], state, gen, n) if planners else None
        if plan is None:
            perm = torch.randperm(n, generator=gen)
            plan = [(perm[b * batch_size : (b + 1) * batch_size], None) for b in range(steps_per_epoch)]
        elif epoch == 0:
            total = state.total_steps = epochs * len(plan)
            if bar is not None:
                bar.total = total
        tot = 0.0
        for idx, w in plan:
            cur_lr = _lr_at(lr, lr_schedule, state.step, total)
            for gpar in opt.param_groups:
                gpar["lr"] = cur_lr
            state.epoch, state.batch_indices, state.lr = epoch, idx.numpy(), cur_lr
            state.batch_weights = None if w is None else w.numpy()
            for cb in callbacks:
                cb.on_batch_begin(state)
            dev_idx = idx.to(X.device)
            out = module(X[dev_idx])
            if out.ndim == 1:
                out = out[:, None]
            loss = loss_fn(out, y[dev_idx])
            loss = loss.mean() if w is None else (loss * w.to(loss)).sum() / w.sum().to(loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {loss.item()} at epoch {epoch}, step {state.step}: "
                    "lower the learning rate (lr) or check the inputs."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.step += 1
            state.loss = float(loss.detach())
            tot += state.loss * (len(idx) if w is None else float(w.sum()))
            for cb in callbacks:
                cb.on_batch_end(state)
            if bar is not None:
                bar.update(1)
        history.append(tot / _planned_weight(plan))
        for cb in callbacks:
            cb.on_epoch_end(state)
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    if bar is not None:
        bar.close()
    module.eval()
    for cb in callbacks:
        cb.on_train_end(state)
    return history


def _planned(planner, state, gen, n):
    """A callback's batches for this epoch as ``[(LongTensor, weights or None)]`` (validated)."""
    plan = planner.plan_epoch(state, gen)
    if plan is None:
        return None
    out = []
    for b in plan:
        idx, w = b if isinstance(b, tuple) else (b, None)
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if idx.ndim != 1 or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"{type(planner).__name__}.plan_epoch gave a batch that is not a non-empty "
                             f"list of indices in [0, {n}).")
        if w is not None:
            w = torch.as_tensor(np.asarray(w, dtype=np.float64))
            if w.shape != idx.shape or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"{type(planner).__name__}.plan_epoch gave loss weights that are not "
                                 "finite, non-negative, one per index and with a positive sum.")
        out.append((idx, w))
    if not out:
        raise ValueError(f"{type(planner).__name__}.plan_epoch gave no batch.")
    return out


def _planned_weight(plan):
    """The examples in the epoch's losses (n for the default shuffle)."""
    return sum(len(i) if w is None else float(w.sum()) for i, w in plan)


def copy_callbacks(callbacks):
    return [copy.deepcopy(cb) for cb in (callbacks or ())]
