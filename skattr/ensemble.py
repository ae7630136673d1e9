"""The retraining harness: copies of a TorchModel trained on subsets, seeded, cached, in parallel.

Used by TRAK ensembles (TRAK-k), the linear datamodeling score's subset models
(:class:`skattr.metrics.SubsetRetrainer`) and remove-and-retrain
(:func:`skattr.estimators.concept.remove_and_retrain`): each job is
``clone(template).set_params(random_state=seed).fit(X[idx], y[idx])``, optionally cached as a
joblib file (an interrupted run resumes model by model), run through ``joblib.Parallel`` so
``n_jobs`` (and ``joblib.parallel_config``) spread it over processes.  Each job depends only on
its own subset and seed, so the models are the same for any ``n_jobs``.

It also turns what users pass as "the models" (fitted TorchModels, state dicts, recorded
checkpoints, file paths) into TorchModels, and checks that they share one architecture.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.base import clone
from torch.nn.parameter import is_lazy

from .featurize import progress
from .model import TorchModel
from .parallel import BlockError, n_workers, torch_threads
from .store import writer_id

__all__ = ["train_models", "load_member", "check_members", "member_seed", "subset_indices"]


def member_seed(seed, j):
    """The ``SeedSequence`` of ensemble member ``j`` (its subset and its training seed)."""
    return np.random.SeedSequence(int(seed), spawn_key=(j,))


def subset_indices(seed, j, n, fraction):
    """Member ``j``'s training subset (sorted indices) and training seed, from ``seed`` alone:
    the first members of a larger ensemble are the smaller ensemble."""
    ss = member_seed(seed, j)
    size = max(1, int(round(float(fraction) * n)))
    rng = np.random.default_rng(ss)
    idx = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
    return idx, int(ss.generate_state(1)[0] % (2**31 - 1))


def _load_cached(path):
    if path is not None and Path(path).exists():
        try:
            return joblib.load(path)
        except Exception:  # noqa: BLE001 - damaged cache entry: retrain it
            return None
    return None


def _train_one(template, X, y, idx, seed, path):
    est = _load_cached(path)
    if est is not None:
        return est
    est = clone(template)
    if seed is not None:
        est.set_params(random_state=int(seed))
    est.fit(X[idx], y[idx])
    if path is not None:
        path = Path(path)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        joblib.dump(est, tmp)
        os.replace(tmp, path)
    return est


def _train_job(j, threads, *args):
    try:
        with torch_threads(threads):  # the caller's torch threads: the same rounding as in it
            return _train_one(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the model and the worker
        raise BlockError(f"Training model {j} failed on worker {writer_id()}: "
                         f"{type(exc).__name__}: {exc}") from exc


def train_models(template, X, y, subsets, seeds, *, paths=None, n_jobs=None, verbose=0,
                 desc="training models"):
    """Train ``clone(template)`` on each subset with its seed; returns the fitted models.

    Parameters
    ----------
    template : TorchModel
        Its training settings are reused; its fitted weights are ignored.
    X, y : training set (array or tensor, labels).
    subsets : list of index arrays
        The training rows of each model.
    seeds : list of int or None
        ``random_state`` of each model (None keeps the template's).
    paths : list of path or None, default=None
        Cache file of each model (``joblib``): loaded when present, written when trained.
    n_jobs : int or None, default=None
        Models trained in parallel by ``joblib.Parallel`` (``None``: the active
        ``joblib.parallel_config``'s workers, one at a time in this process by default; under
        ``parallel_config(backend="dask")`` on the Dask cluster).  Each worker receives only
        its model's rows.  The result does not depend on it.
    """
    M = len(subsets)
    paths = [None] * M if paths is None else list(paths)
    for p in paths:
        if p is not None:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    if n_workers(n_jobs) == 1:
        return [
            _train_one(template, X, y, subsets[j], seeds[j], paths[j])
            for j in progress(range(M), M, verbose, desc)
        ]
    # cached models are loaded here; only the missing ones travel to the workers
    models = [_load_cached(p) for p in paths]
    todo = [j for j in range(M) if models[j] is None]
    fitted = joblib.Parallel(n_jobs=n_jobs, verbose=10 if verbose > 1 else 0)(
        joblib.delayed(_train_job)(j, torch.get_num_threads(), template, X[subsets[j]], y[subsets[j]],
                                   np.arange(len(subsets[j])), seeds[j], paths[j])
        for j in todo
    )
    for j, m in zip(todo, fitted):
        models[j] = m
    return models


def _copy_without_history(model):
    """A copy of a TorchModel with its own network, without its fitted callbacks (a recorded
    trajectory can hold many checkpoints: copying it for every member is wasted work)."""
    member = copy.copy(model)
    member.__dict__ = dict(model.__dict__)
    member.callbacks_ = []
    if hasattr(model, "module_"):
        member.module_ = copy.deepcopy(model.module_)
    else:
        member.module = copy.deepcopy(model.module)
    return member


def load_member(template, obj, where="models[0]"):
    """A TorchModel from a fitted TorchModel, a state dict of ``template``'s network, a
    ``(step, state_dict)`` checkpoint (as :class:`~skattr.TrajectoryRecorder` records them) or
    a path to a file saved with ``torch.save``."""
    if isinstance(obj, TorchModel):
        return copy.deepcopy(obj)
    if isinstance(obj, (str, os.PathLike)):
        try:
            obj = torch.load(obj, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{where}: cannot load the checkpoint file {obj!r}: {exc}") from exc
        if isinstance(obj, TorchModel):
            return copy.deepcopy(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping):
        obj = obj[1]  # (step, state_dict) as recorded by TrajectoryRecorder
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        member = _copy_without_history(template)
        net = member.module_ if hasattr(member, "module_") else member.module
        try:
            net.load_state_dict(dict(obj))
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            raise ValueError(
                f"{where} is a state dict that does not match the model's network: "
                f"{lines[0]} {lines[1:3]}"
            ) from exc
        return member
    raise TypeError(
        f"{where} must be a TorchModel, a state dict, a (step, state_dict) checkpoint or a "
        f"path, got {type(obj).__name__}."
    )


def _shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.network().named_parameters()]


def _first_difference(shapes, ref_shapes):
    """``"parameter 'k' has shape A vs B"`` for the first parameter whose shape differs."""
    da, db = dict(shapes), dict(ref_shapes)
    diff = [k for k in dict.fromkeys(list(da) + list(db)) if da.get(k) != db.get(k)]
    k = diff[0] if diff else "?"
    return f"parameter {k!r} has shape {da.get(k, 'missing')} vs {db.get(k, 'missing')}"


def check_members(members, X, name="models", kind="Ensemble member", template=None):
    """Raise unless every model shares the first one's task, architecture, parameters, dtype,
    classes and outputs (and the ``template``'s architecture, when it has no lazy layer), and
    was fitted on inputs shaped like ``X``'s rows."""
    ref = members[0]
    ref_shapes = _shapes(ref)
    if template is not None and not any(is_lazy(p) for p in template.network().parameters()):
        t_shapes = _shapes(template)
        if t_shapes != ref_shapes:
            raise ValueError(
                f"{kind} {name}[0] does not match the model's network: "
                f"{_first_difference(ref_shapes, t_shapes)} (different architectures)."
            )
    for i, m in enumerate(members[1:], 1):
        msg = f"{kind} {name}[{i}] does not match {name}[0]"
        if m.task != ref.task:
            raise ValueError(f"{msg}: task {m.task!r} vs {ref.task!r}.")
        shapes = _shapes(m)
        if shapes != ref_shapes:
            raise ValueError(f"{msg}: {_first_difference(shapes, ref_shapes)} (different architectures).")
        if m.prefixes_ != ref.prefixes_ or m.dtype != ref.dtype:
            raise ValueError(f"{msg}: params/dtype differ ({m.params!r}, {m.dtype!r}).")
        if ref.task == "classification":
            ca, cb = m.class_labels(), ref.class_labels()
            if len(ca) != len(cb) or np.any(ca != cb):
                raise ValueError(f"{msg}: classes {ca.tolist()[:10]} vs {cb.tolist()[:10]}.")
        if m.n_outputs_ != ref.n_outputs_:
            raise ValueError(f"{msg}: {m.n_outputs_} outputs vs {ref.n_outputs_}.")
    for i, m in enumerate(members):
        if hasattr(m, "input_shape_") and tuple(m.input_shape_) != tuple(X.shape[1:]):
            raise ValueError(
                f"{kind} {name}[{i}] was fitted on inputs of trailing shape "
                f"{tuple(m.input_shape_)}, but X has trailing shape {tuple(X.shape[1:])}."
            )
