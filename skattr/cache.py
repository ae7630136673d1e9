"""FeatureCache: projected features computed once per sample, reused across clones and sizes."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch

__all__ = ["FeatureCache"]


def _row_hashes(X):
    A = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    A = np.ascontiguousarray(A).reshape(A.shape[0], -1)
    return [hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in A]


class FeatureCache:
    """An in-memory cache of unscaled projected features, keyed by sample content.

    Pass one instance as ``memory=`` to kernel estimators: every clone made by ``GridSearchCV``
    or ``cross_val_score`` shares it (``copy.deepcopy`` returns the same cache), so each distinct
    sample is featurised once per (model, output, projection kind, seed).  Because projections
    are nested (:mod:`skattr.projection`), features stored at ``k`` rows serve every smaller
    ``projection_dim``; a larger one computes only the extra rows.  Entries are keyed by the bytes
    of each sample, so CV folds, subsets and reorderings all hit.

    The cache is not pickled with an estimator (a pickled estimator carries an empty cache).

    Parameters
    ----------
    max_bytes : int, default=None
        Refuse to grow beyond this many bytes of features (``None``: no bound).

    Examples
    --------
    >>> from skattr.cache import FeatureCache
    >>> import copy
    >>> cache = FeatureCache()
    >>> copy.deepcopy(cache) is cache
    True
    """

    def __init__(self, max_bytes=None):
        self.max_bytes = max_bytes
        self._store = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FeatureCache, (self.max_bytes,))

    def clear(self):
        self._store.clear()

    def nbytes(self):
        return sum(e["F"].numel() * e["F"].element_size() for e in self._store.values())

    def get(self, key, X, k, compute):
        """Features (n, m, k) of ``X`` (unscaled), computing what is missing.

        ``compute(X_rows, start, k)`` must return the unscaled features of rows
        ``start:start + k`` of the nested projection for the given samples.
        """
        hashes = _row_hashes(X)
        with self._lock:
            e = self._store.get(key)
            if e is None:
                e = {"index": {}, "F": None, "k": 0}
                self._store[key] = e
            # extend every cached row to k features if needed (nested rows: only the new ones)
            if e["F"] is not None and k > e["k"]:
                rows = e["rows"]
                ext = compute(rows, e["k"], k - e["k"])
                e["F"] = torch.cat([e["F"], ext.to(e["F"].device)], dim=-1)
                e["k"] = k
            missing = [i for i, h in enumerate(dict.fromkeys(hashes)) if h not in e["index"]]
            uniq = list(dict.fromkeys(hashes))
            first = {h: i for i, h in reversed(list(enumerate(hashes)))}
            if missing:
                self.misses += len(missing)
                idx = [first[uniq[i]] for i in missing]
                sel = X[idx] if not isinstance(X, list) else [X[i] for i in idx]
                kk = max(k, e["k"])
                newF = compute(sel, 0, kk)
                base = 0 if e["F"] is None else e["F"].shape[0]
                for j, i in enumerate(missing):
                    e["index"][uniq[i]] = base + j
                if e["F"] is None:
                    e["F"], e["rows"] = newF, sel
                else:
                    e["F"] = torch.cat([e["F"], newF.to(e["F"].device)])
                    e["rows"] = _concat(e["rows"], sel)
                e["k"] = kk
                if self.max_bytes is not None and self.nbytes() > self.max_bytes:
                    raise MemoryError(
                        f"FeatureCache holds {self.nbytes() / 2**20:.1f} MiB, more than "
                        f"max_bytes={self.max_bytes}; use a larger max_bytes or clear() it."
                    )
            self.hits += len(hashes) - len(missing)
            pos = torch.as_tensor([e["index"][h] for h in hashes], device=e["F"].device)
            return e["F"].index_select(0, pos)[..., :k]


def _concat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    return np.concatenate([a, b])
