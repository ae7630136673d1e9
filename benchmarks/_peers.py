"""Adapters that run peer attribution libraries for side-by-side benchmarks.

Currently: ``traker`` (PyPI ``traker`` 0.3.x, MadryLab TRAK), forced onto CPU.

Install (never let pip touch torch; traker only needs torch, numpy, tqdm)::

    pip install --no-deps traker      # do NOT install fast_jl (CUDA only)

Notes on traker's CPU path
--------------------------
* ``TRAKer(device="cpu")`` must get the *string* ``"cpu"``: ``finalize_scores``
  tests ``self.device != "cpu"`` and would try ``pin_memory()`` otherwise.
* Without an explicit ``projector=`` traker picks ``BasicProjector`` with a
  *normal* sketch on CPU; we pass our own ``BasicProjector`` so the projection
  type (rademacher/normal) and seed are explicit.
* ``BasicProjector`` regenerates its ``(n_params, block_size)`` random block
  for every block on every ``project`` call (default ``block_size=100``, so
  ``proj_dim/100`` blocks per batch); this regeneration dominates the CPU cost.
  When ``block_size >= proj_dim`` the matrix is built once (in the
  constructor, i.e. outside the timed region) and reused.
* traker stores ``P^T grad / sqrt(n_params)``; ``traker_featurize`` returns
  exactly what traker stores (pass ``unnormalize=True`` to undo the factor).
* ``finalize_scores`` returns a ``(n_train, n_test)`` memmap; we transpose
  to ``(n_test, n_train)``.  Its scores equal
  ``phi_test (F^T F)^{-1} F^T * (1 - p_train)`` *divided by* the global
  constant ``mean(|(F^T F)^{-1}|)`` (BasicScoreComputer rescales the inverse
  "for float16 stability"), with ``F``/``phi`` the featurize outputs; compare
  rankings/correlations, or undo that constant, not raw magnitudes.
* ``load_from_save_dir=False`` skips creating ``experiments.json`` and
  ``start_scoring_checkpoint`` then crashes, so we keep traker's default
  ``True``; a reused ``save_dir`` that already holds model_id 0 raises
  ``ModelIDException``.
* ``finalize_features``/``finalize_scores`` draw tqdm bars on stderr.
* The first featurize in a process pays a few seconds of one-off start-up;
  warm up before timing.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time

import numpy as np
import torch


def _require_trak():
    try:
        import trak  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "traker is not installed; run `pip install --no-deps traker` "
            "(its only deps are torch, numpy, tqdm)"
        ) from e


@contextlib.contextmanager
def _save_dir_ctx(save_dir):
    if save_dir is None:
        with tempfile.TemporaryDirectory(prefix="traker_") as d:
            yield d
    else:
        yield str(save_dir)


def _as_tensors(X, y):
    X = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32))
    y = torch.as_tensor(np.ascontiguousarray(y, dtype=np.int64)).reshape(-1)
    if X.ndim < 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0] if X.ndim else 0} rows but y has {y.shape[0]}")
    return X, y


def _make_traker(module, train_set_size, proj_dim, save_dir, proj_type, seed,
                 block_size, logging_level):
    _require_trak()
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    module = module.to("cpu").float().eval()
    grad_dim = sum(p.numel() for p in module.parameters())
    projector = BasicProjector(
        grad_dim=grad_dim,
        proj_dim=int(proj_dim),
        seed=int(seed),
        proj_type=ProjectionType(proj_type),
        device="cpu",
        block_size=int(block_size),
        dtype=torch.float32,
    )
    traker = TRAKer(
        model=module,
        task="image_classification",
        train_set_size=int(train_set_size),
        save_dir=save_dir,
        load_from_save_dir=True,  # False skips creating experiments.json -> scoring crashes
        device="cpu",  # must be the str "cpu" (see module docstring)
        projector=projector,
        use_half_precision=False,
        logging_level=logging_level,
    )
    return traker, projector


def _batches(X, y, batch_size):
    n = X.shape[0]
    for st in range(0, n, batch_size):
        yield X[st:st + batch_size], y[st:st + batch_size]


def traker_featurize(module, X, y, proj_dim, batch_size=256, save_dir=None,
                     proj_type="rademacher", seed=0, block_size=100,
                     unnormalize=False, logging_level=logging.WARNING, timings=None):
    """Featurise (X, y) with traker on CPU for a trained ``nn.Module`` classifier.

    Returns ``(features, seconds)`` where ``features`` is an ``(n, proj_dim)``
    float32 array of traker's projected per-example gradients of the
    multiclass margin ``log p_y/(1-p_y)`` (as stored by traker, i.e. divided by
    ``sqrt(n_params)`` unless ``unnormalize=True``) and ``seconds`` is the
    wall time of the ``load_checkpoint`` + ``featurize`` calls only (TRAKer /
    projector construction excluded).  If ``timings`` is a dict, it receives
    ``setup_s``, the wall time of that construction (which, with
    ``block_size >= proj_dim``, includes generating the whole projection
    matrix once).
    """
    X, y = _as_tensors(X, y)
    n = X.shape[0]
    with _save_dir_ctx(save_dir) as d:
        t_setup = time.perf_counter()
        traker, _ = _make_traker(module, n, proj_dim, d, proj_type, seed,
                                 block_size, logging_level)
        if timings is not None:
            timings["setup_s"] = time.perf_counter() - t_setup
        ckpt = {k: v.detach().clone() for k, v in module.state_dict().items()}
        t0 = time.perf_counter()
        traker.load_checkpoint(ckpt, model_id=0)
        for xb, yb in _batches(X, y, batch_size):
            traker.featurize(batch=(xb, yb), num_samples=xb.shape[0])
        seconds = time.perf_counter() - t0
        feats = np.array(traker.saver.current_store["grads"], dtype=np.float32, copy=True)
        if unnormalize:
            feats *= float(traker.normalize_factor)
        del traker
    return feats, seconds


def traker_scores(module, X_train, y_train, X_test, y_test, proj_dim,
                  batch_size=256, save_dir=None, proj_type="rademacher", seed=0,
                  block_size=100, exp_name="test", logging_level=logging.WARNING):
    """Full traker pipeline on CPU (single checkpoint, model_id 0).

    load_checkpoint -> featurize(train) -> finalize_features ->
    start_scoring_checkpoint -> score(test) -> finalize_scores.

    Returns ``(scores, seconds)`` with ``scores`` of shape ``(n_test, n_train)``
    (traker itself returns ``(n_train, n_test)``) and ``seconds`` the wall time
    of the whole pipeline (TRAKer / projector construction excluded).
    """
    Xtr, ytr = _as_tensors(X_train, y_train)
    Xte, yte = _as_tensors(X_test, y_test)
    with _save_dir_ctx(save_dir) as d:
        traker, _ = _make_traker(module, Xtr.shape[0], proj_dim, d, proj_type,
                                 seed, block_size, logging_level)
        ckpt = {k: v.detach().clone() for k, v in module.state_dict().items()}
        t0 = time.perf_counter()
        traker.load_checkpoint(ckpt, model_id=0)
        for xb, yb in _batches(Xtr, ytr, batch_size):
            traker.featurize(batch=(xb, yb), num_samples=xb.shape[0])
        traker.finalize_features(model_ids=[0])
        traker.start_scoring_checkpoint(exp_name=exp_name, checkpoint=ckpt,
                                        model_id=0, num_targets=Xte.shape[0])
        for xb, yb in _batches(Xte, yte, batch_size):
            traker.score(batch=(xb, yb), num_samples=xb.shape[0])
        scores = traker.finalize_scores(exp_name=exp_name, model_ids=[0])
        seconds = time.perf_counter() - t0
        scores = np.array(scores, dtype=np.float32, copy=True).T.copy()
        del traker
    return scores, seconds


if __name__ == "__main__":
    import trak
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    n_params = sum(p.numel() for p in net.parameters())
    from trak.projectors import BasicProjector

    print(f"traker {getattr(trak, '__version__', '?')} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | n_params {n_params}")
    print(f"CPU projector: {BasicProjector.__module__}.{BasicProjector.__qualname__}")
    n = 256
    # untimed warm-up: the first featurize in a process pays ~3s of one-off
    # torch.func/vmap + allocator start-up cost
    traker_featurize(net, X[:n], y[:n], proj_dim=100)
    for proj_type in ("rademacher", "normal"):
        for proj_dim in (512, 2048):
            feats, sec = traker_featurize(net, X[:n], y[:n], proj_dim=proj_dim,
                                          proj_type=proj_type)
            assert feats.shape == (n, proj_dim) and np.isfinite(feats).all()
            print(f"featurize n={n} proj_dim={proj_dim} {proj_type}: {sec:.3f}s "
                  f"-> {n / sec:.1f} samples/s")
    scores, sec = traker_scores(net, X[:n], y[:n], X[n:n + 64], y[n:n + 64], proj_dim=512)
    assert scores.shape == (64, n) and np.isfinite(scores).all()
    print(f"scores n_train={n} n_test=64 proj_dim=512: {sec:.3f}s, shape {scores.shape}")
