"""Independent work over blocks through joblib: featurisation, Gram matrices, scores.

Every loop here runs through ``joblib.Parallel``, so ``n_jobs`` spreads it over local processes
and ``with joblib.parallel_config(backend="dask"):`` (with a ``dask.distributed.Client``) over a
cluster.  Each job handles one block of training examples and depends only on that block's rows
and the model's seed -- never on which worker runs it or on how many there are:

* :func:`featurize_blocks` -- a worker receives its shard of ``X`` (not all of it), featurises
  it and writes the block straight into the on-disk :class:`~skattr.store.FeatureStore` (a
  completion marker per block; finished blocks survive a dead worker and are never recomputed);
  into an in-memory store the block is sent back;
* :func:`block_gram` -- ``Phi^T Phi`` summed over blocks, one block per job (each worker holds
  only its block), the per-block products added in block order;
* :func:`score_blocks` -- the ``(n_targets, n_train)`` scores of an attributor, one column block
  per job, written to a :class:`~skattr.store.ScoreStore` or merged into a streamed top-k.

* :func:`run_blocks` -- any other list of independent jobs (influence-function solves over blocks
  of targets, TracIn's checkpoints), results returned in job order.

A job that raises is reported as a :class:`BlockError` naming the block, its rows and the worker
(``host:pid``).  A worker that dies is replaced by Dask and its block rerun; a block whose worker
dies every time (more than the scheduler's ``allowed-failures``) stops the run with a
:class:`BlockError` naming the block and the workers, where joblib's own Dask backend would wait
for it forever; finished blocks of an on-disk store are kept.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import warnings

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from joblib.parallel import get_active_backend

from .store import ScoreStore, TopK, _merge_top, top_k_blocks, writer_id

__all__ = ["BlockError", "block_gram", "featurize_blocks", "n_workers", "run_blocks",
           "score_blocks", "torch_threads"]


class BlockError(RuntimeError):
    """A block's job failed: the message names the block, its rows and the worker."""


_LOCAL_BACKENDS = {"LokyBackend", "MultiprocessingBackend", "SequentialBackend", "ThreadingBackend"}


def n_workers(n_jobs):
    """Workers joblib would use for ``n_jobs`` under the active ``parallel_config`` (1: run in
    this process, no pickling).  Under a cluster backend (Dask) the work goes to the cluster
    unless ``n_jobs=1``, even while only one of its workers is up."""
    n = max(1, int(effective_n_jobs(n_jobs)))
    if n == 1 and n_jobs != 1 and type(get_active_backend()[0]).__name__ not in _LOCAL_BACKENDS:
        return 2
    return n


def _shard(a, r0, r1):
    """Rows ``r0:r1`` of an array or tensor, as a copy (a pickled view would carry all rows)."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a[r0:r1].clone()
    return np.array(a[r0:r1])


class torch_threads:
    """Run a job with torch's intra-op thread count of the caller: products are split the same
    way as in a serial run, so their rounding is the same (joblib's process workers and
    Python threads would otherwise use their own counts)."""

    def __init__(self, n):
        self.n = int(n)

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


@functools.cache
def _dask_backend_class():
    """joblib's Dask backend with failed tasks reported (built on first use: it imports
    ``distributed``)."""
    from joblib._dask import DaskDistributedBackend

    class _ReportingDaskBackend(DaskDistributedBackend):
        """joblib 1.6's Dask backend hands a task that Dask marks failed (``KilledWorker``:
        its worker died more than ``allowed-failures`` times, or the task could not be
        deserialised) to the waiting future only, never to joblib's completion callback, so
        ``Parallel`` waits for it forever, whatever ``return_as``.  Here the callback gets a
        :class:`BlockError` naming the task's block.  And with one worker up (a one-worker
        cluster, or one of two restarting) joblib would run the tasks one by one in this
        process instead of on the cluster: here they go to the cluster."""

        def effective_n_jobs(self, n_jobs):
            return max(2, super().effective_n_jobs(n_jobs))

        def start_call(self):
            # joblib scatters every argument over 1 kB to ONE worker, without replicas: when
            # that worker dies the data is gone and the task is cancelled ("already
            # forgotten") instead of rerun.  Without call_data_futures the arguments travel
            # in the task itself, so Dask can rerun it on another worker.
            super().start_call()
            self.call_data_futures = None

        def stop_call(self):
            self.call_data_futures = {}  # joblib clears it
            super().stop_call()

        def submit(self, func, callback=None):
            what = _describe(func)

            def report(out):
                if isinstance(out, _TaskFailed):
                    exc = out.exc
                    out = BlockError(f"The worker running {what} died or failed on every try "
                                     f"({type(exc).__name__}: {exc})")
                return callback(out)

            return super().submit(func, callback=report if callback is not None else None)

        async def _collect(self):
            while self._continue:
                async for future, result in self.waiting_futures:
                    cf_future = self._results.pop(future)
                    callback = self._callbacks.pop(future)
                    if future.status == "error":
                        _, exc, _ = result
                        cf_future.set_exception(exc)
                        if callback is not None:
                            callback(_TaskFailed(exc))
                    else:
                        cf_future.set_result(result)
                        callback(result)
                await asyncio.sleep(0.01)

    return _ReportingDaskBackend


class _TaskFailed:
    def __init__(self, exc):
        self.exc = exc


def _describe(func):
    """What a joblib batch of one task computes: ``describe(*args)`` of its function."""
    try:
        f, args, kwargs = func.items[0]
        return f.describe(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a task of another kind: name it generically
        return "a task"


def _backend():
    """The backend for ``Parallel``: ``None`` (the active one), or, when it is joblib's Dask
    backend, the same client through :func:`_dask_backend_class` (failed tasks reported)."""
    active = get_active_backend()[0]
    if type(active).__name__ != "DaskDistributedBackend" or not hasattr(active, "_collect"):
        return None
    try:
        cls = _dask_backend_class()
    except ImportError:  # pragma: no cover
        return None
    new = cls(client=active.client, wait_for_workers_timeout=active.wait_for_workers_timeout,
              **active.submit_kwargs)
    new._scatter, new.data_futures = active._scatter, active.data_futures
    return new


def _run(jobs, n_jobs, verbose, total, desc, return_as="generator_unordered"):
    """``Parallel(return_as=...)`` over ``jobs``, one block per task (a retried task redoes one
    block), with a progress bar."""
    from .featurize import progress

    it = Parallel(n_jobs=n_jobs, backend=_backend(), return_as=return_as, batch_size=1,
                  verbose=10 if verbose > 1 else 0)(jobs)
    return progress(it, total, verbose, desc)


def _block_job(fn, args, name, threads, catch):
    """One job of :func:`run_blocks` in a worker: ``fn(*args)`` with the caller's torch thread
    count, its warnings recorded (``catch``) to be re-emitted by the caller."""
    try:
        if not catch:
            with torch_threads(threads):
                return fn(*args), []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch_threads(threads):
                out = fn(*args)
        return out, [(w.category, str(w.message)) for w in caught]
    except Exception as exc:  # noqa: BLE001 - re-raised with the block and worker named
        raise BlockError(f"{name[:1].upper()}{name[1:]} failed on worker {writer_id()}: "
                         f"{type(exc).__name__}: {exc}") from exc


_block_job.describe = lambda fn, args, name, *a: name


def run_blocks(fn, args, names, *, n_jobs=None, verbose=0, desc="blocks", replay=True):
    """``fn(*a)`` for each ``a`` in ``args``, one joblib job each, results yielded in job order.

    For independent work of an estimator that is not a block of a feature store (solves over
    blocks of targets, TracIn's checkpoints).  Run it only with more than one worker
    (:func:`n_workers`); with one, call ``fn`` in this process.

    Parameters
    ----------
    fn : callable
        A module-level function (process and Dask workers import it).
    args : list of tuple
    names : list of str
        What each job computes ("target rows 0:64"), for errors.
    replay : bool, default=True
        Re-emit here, in job order, the warnings each job raised (in a process or Dask worker
        they would not reach the caller).  ``False``: yield ``(result, [(category, message),
        ...])`` instead, for the caller to re-emit.

    Raises
    ------
    BlockError
        A job raised (named, with its worker), or its worker died on every try.
    """
    backend = get_active_backend()[0]
    threads = bool(getattr(backend, "uses_threads", False))
    nt = torch.get_num_threads()
    # thread workers share this process: each job gets its own copy of its arguments (networks
    # carry hooks, solvers keep state) and warnings pass through (catching them is not
    # thread-safe); process workers receive copies anyway
    jobs = [delayed(_block_job)(fn, copy.deepcopy(a) if threads else a, name, nt, not threads)
            for a, name in zip(args, names)]
    try:
        for out, caught in _run(jobs, n_jobs, verbose, len(jobs), desc, return_as="generator"):
            if not replay:
                yield out, caught
                continue
            for category, message in caught:
                warnings.warn(message, category, stacklevel=2)
            yield out
    except BlockError:
        raise
    except Exception as exc:
        raise _stopped(exc, None, desc[:1].upper() + desc[1:]) from exc


def _stopped(exc, store, what):
    """The error raised when a worker died (or the backend failed) mid-run."""
    kept = ""
    if getattr(store, "path", None) is not None:
        left = len(store.missing(verify=False))
        kept = (f"; {store.n_blocks * getattr(store, 'n_models', 1) - left} finished block(s) are "
                f"kept in {store.path} and {left} remain: run it again to resume")
    return RuntimeError(f"{what} stopped: a worker failed ({type(exc).__name__}: {exc}){kept}.")


# ---------------------------------------------------------------------------- featurisation
def _featurize_block(fz, Xs, ys, m, b, r0, r1, dim, store, threads):
    try:
        if store is not None and store.done(m, b, verify=False) and store._valid(m, b):
            return m, b, None, None  # finished by an earlier attempt of a retried task
        with torch_threads(threads):
            F, q = fz.rows(Xs, ys, 0, r1 - r0, dim=dim)
        if store is None:
            return m, b, F, q
        store.write(m, b, F, q)
        return m, b, None, None
    except Exception as exc:  # noqa: BLE001 - re-raised with the block and worker named
        raise BlockError(
            f"Featurising block {b} of model {m} (rows {r0}:{r1}) failed on worker "
            f"{writer_id()}: {type(exc).__name__}: {exc}"
        ) from exc


_featurize_block.describe = lambda fz, Xs, ys, m, b, r0, r1, *a: (
    f"the featurisation of block {b} of model {m} (rows {r0}:{r1})")


def featurize_blocks(featurizer, X, y_enc, store, todo, *, dim, n_jobs=None, verbose=0,
                     desc="featurising"):
    """Featurise blocks ``todo`` (``[(model, block), ...]``) of ``X`` into ``store``.

    Parameters
    ----------
    featurizer : callable
        ``featurizer(m)`` -> the :class:`~skattr.featurize.Featurizer` of model ``m``.
    X : array or tensor (n, ...)
    y_enc : list of tensors or None
        Encoded targets of all of ``X`` per model.
    store : FeatureStore or MemoryStore
    todo : list of (int, int)
    dim : int
        Feature dimension.
    n_jobs : int or None
        joblib workers (``None``: the active ``parallel_config``'s, one by default).  With one
        worker the blocks run in this process, in order.  The features do not depend on it.
    """
    fzs = {}

    def fz(m):
        return fzs.get(m) or fzs.setdefault(m, featurizer(m))

    if n_workers(n_jobs) == 1:
        for m, b in _progress(todo, verbose, desc):
            r0, r1 = store.block_range(b)
            F, q = fz(m).rows(X, y_enc[m], r0, r1, out=store.rows(m, b), dim=dim)
            store.write(m, b, F, q)
        return store
    on_disk = getattr(store, "path", None) is not None
    if on_disk:
        store.cleanup(0.0)  # leftovers of interrupted runs, before any worker writes
    # thread workers share this process: each job gets its own copy of the network (the
    # gradient engine hooks into it); process workers receive a copy anyway
    threads = bool(getattr(get_active_backend()[0], "uses_threads", False))
    jobs = []
    for m, b in todo:
        r0, r1 = store.block_range(b)
        jobs.append(delayed(_featurize_block)(
            copy.deepcopy(fz(m)) if threads else fz(m), _shard(X, r0, r1), None if y_enc[m] is None else _shard(y_enc[m], r0, r1),
            m, b, r0, r1, dim, store if on_disk else None, torch.get_num_threads()))
    try:
        # blocks are written into the (preallocated) in-memory store as they arrive: at most
        # the blocks in flight are held besides it
        for m, b, F, q in _run(jobs, n_jobs, verbose, len(jobs), desc):
            if not on_disk:
                store.write(m, b, F, q)
            del F, q
    except BlockError as exc:
        if on_disk:
            left = len(store.missing(verify=False))
            raise BlockError(f"{exc} ({left} block(s) remain; the finished ones are kept in "
                             f"{store.path}: fit again to resume)") from exc
        raise
    except Exception as exc:
        raise _stopped(exc, store, "Featurisation") from exc
    if on_disk:
        store._scan()
    return store


def _progress(items, verbose, desc):
    from .featurize import progress

    return progress(items, len(items), verbose, desc)


# ---------------------------------------------------------------------------- Gram
def _block_gram(features, m, b, dtype, acc, device, threads):
    from ._linalg import upper_gram
    from .preconditioners import as_tensor

    try:
        F, _ = features.read(m, b)
        with torch_threads(threads):
            return b, upper_gram(as_tensor(F, device, dtype).T, acc).cpu()
    except Exception as exc:  # noqa: BLE001
        raise BlockError(f"The Gram product of block {b} of model {m} failed on worker "
                         f"{writer_id()}: {type(exc).__name__}: {exc}") from exc


_block_gram.describe = lambda features, m, b, *a: f"the Gram product of block {b} of model {m}"


def block_gram(features, m, dtype, acc, device="cpu", n_jobs=None):
    """Upper triangle of ``Phi_m^T Phi_m`` (k, k) in ``acc``: per-block products in ``dtype``
    (each job reads only its block), added in block order whatever ``n_jobs``."""
    nb = features.n_blocks if hasattr(features, "path") else 1
    if nb == 1 or n_workers(n_jobs) == 1 or not hasattr(features, "path"):
        from ._linalg import upper_gram
        from .preconditioners import as_tensor

        U = None
        for _, _, F, _ in features.iter_blocks(m):
            Ub = upper_gram(as_tensor(F, device, dtype).T, acc)
            U = Ub if U is None else U.add_(Ub)
        return U
    parts, U, nxt = {}, None, 0
    try:
        jobs = [delayed(_block_gram)(features, m, b, dtype, acc, "cpu", torch.get_num_threads())
                for b in range(nb)]
        for b, Ub in _run(jobs, n_jobs, 0, nb, ""):
            parts[b] = Ub
            while nxt in parts:  # added in block order (the same sum as one process) as soon
                Ub = parts.pop(nxt).to(device)  # as the blocks before have arrived
                U = Ub if U is None else U.add_(Ub)
                nxt += 1
    except BlockError:
        raise
    except Exception as exc:
        raise _stopped(exc, None, "The Gram matrix") from exc
    return U


# ---------------------------------------------------------------------------- scores
def _columns(features, m, b):
    """Model ``m``'s features of block ``b`` (a memory map of an on-disk block)."""
    if getattr(features, "path", None) is not None:
        return features.read(m, b)[0]
    r0, r1 = features.block_range(b)
    return features.F[m][r0:r1]


def _score_block(targets, blocks, scale, chunk):
    """``sum_m T_m F_m^T * scale`` for one column block (``blocks[m]``: its rows of model
    ``m``'s features), with the arithmetic of
    :meth:`skattr.preconditioners.Preconditioner.scores`: column chunks of the block, products
    in ``T``'s precision, accumulated in float64."""
    from .preconditioners import as_tensor

    S = None
    for m, T in targets:
        Fb = as_tensor(blocks[m], T.device, T.dtype)
        first = S is None
        if first:
            S = torch.empty(T.shape[0], Fb.shape[0], dtype=torch.float64, device=T.device)
        for c0 in range(0, Fb.shape[0], chunk):
            c1 = min(Fb.shape[0], c0 + chunk)
            prod = T @ Fb[c0:c1].T
            if first:
                S[:, c0:c1].copy_(prod)
            else:
                S[:, c0:c1].add_(prod)
    S *= torch.from_numpy(np.ascontiguousarray(scale)).to(S.device)[None, :]
    return S.cpu().numpy()


def _score_job(targets, features, b, blocks, scale, chunk, out, threads, first=0):
    """One column block in a worker: read from the on-disk ``features`` (or given ``blocks``),
    scored, written to ``out`` (or returned)."""
    try:
        if blocks is None:
            blocks = {m: _columns(features, m, b) for m, _ in targets}
        with torch_threads(threads):
            S = _score_block(targets, blocks, scale, chunk)
        if isinstance(out, int):  # the block's own top-k: all a worker sends back
            c0 = features.block_range(b)[0] if features is not None else first
            return b, top_k_blocks([(c0, S)], S.shape[0], S.shape[1], min(out, S.shape[1]))
        if out is None:
            return b, S
        out.write(b, S)
        return b, None
    except Exception as exc:  # noqa: BLE001
        raise BlockError(f"Scoring training block {b} failed on worker {writer_id()}: "
                         f"{type(exc).__name__}: {exc}") from exc


_score_job.describe = lambda targets, features, b, *a: f"the scores of training block {b}"


def _score_jobs(targets, features, blist, scale, chunk, out):
    on_disk = getattr(features, "path", None) is not None
    for b in blist:
        r0, r1 = features.block_range(b)
        # a worker gets only its block: the store to read it from, or the block's rows
        blocks = None if on_disk else {m: np.array(_columns(features, m, b)) for m, _ in targets}
        yield delayed(_score_job)(targets, features if on_disk else None, b, blocks,
                                  scale[r0:r1], chunk, out, torch.get_num_threads(), r0)


def score_blocks(targets, features, scale, *, out=None, top_k=None, n_jobs=None, verbose=0,
                 chunk=1024):
    """Scores ``sum_m T_m Phi_m^T * scale`` block by block, never the whole matrix at once.

    Parameters
    ----------
    targets : list of (int, tensor)
        ``(model, T_m)``: the preconditioned (and weighted) target features of each model, in
        the precision of the products.
    features : FeatureStore or MemoryStore
        Its blocks of training examples are the column blocks.
    scale : ndarray (n_train,)
        Per-column factor (the reweighting ``Q`` and the mean over models).
    out : ScoreStore, optional
        Write the blocks there (each worker writes its own; finished blocks of a re-opened
        store are skipped).
    top_k : int, optional
        Instead, stream the blocks into the top-k proponents and opponents
        (:class:`~skattr.store.TopK`).
    n_jobs : int or None
        joblib workers, one column block per job; the scores do not depend on it.
    """
    nb, n = features.n_blocks, features.n_rows
    t = targets[0][1].shape[0]
    serial = n_workers(n_jobs) == 1

    def local(b):
        r0, r1 = features.block_range(b)
        return _score_block(targets, {m: _columns(features, m, b) for m, _ in targets},
                            scale[r0:r1], chunk)

    if top_k is not None:
        k = int(top_k)
        if not 1 <= k <= n:
            raise ValueError(f"k must lie in [1, n_train={n}], got {k}.")
        if serial:
            blocks = ((features.block_range(b)[0], local(b)) for b in range(nb))
            return top_k_blocks(blocks, t, n, k)
        # each worker sends its block's top-k; they arrive in any order, and the merge does
        # not depend on it (ties by index)
        best = [None] * 4
        try:
            for _, r in _run(_score_jobs(targets, features, range(nb), scale, chunk, k),
                             n_jobs, verbose, nb, "scoring"):
                best[0], best[1] = _merge_top(best[0], best[1], r.proponents, r.proponent_scores, k, 1.0)
                best[2], best[3] = _merge_top(best[2], best[3], r.opponents, r.opponent_scores, k, -1.0)
        except BlockError:
            raise
        except Exception as exc:
            raise _stopped(exc, None, "Scoring") from exc
        return TopK(*(np.ascontiguousarray(a) for a in best))
    if not isinstance(out, ScoreStore):
        raise TypeError(f"out must be a ScoreStore, got {type(out).__name__}.")
    if (out.shape, out.block_size) != ((t, n), features.block_size):
        raise ValueError(f"The score store {out.path} has shape {out.shape} and block size "
                         f"{out.block_size}, not {(t, n)} and {features.block_size}.")
    todo = [b for _, b in out.missing()]
    if serial:
        for b in _progress(todo, verbose, "scoring"):
            out.write(b, local(b))
        return out
    out.cleanup(0.0)
    try:
        for _ in _run(_score_jobs(targets, features, todo, scale, chunk, out), n_jobs, verbose,
                      len(todo), "scoring"):
            pass
    except BlockError:
        raise
    except Exception as exc:
        raise _stopped(exc, out, "Scoring") from exc
    out._scan()
    return out
