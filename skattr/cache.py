"""FeatureCache: projected features computed once per sample, reused across clones and sizes."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch

from ._linalg import sym_gram

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

    def __init__(self, max_bytes=None, max_gram_bytes=2**30):
        self.max_bytes = max_bytes
        self.max_gram_bytes = max_gram_bytes
        self._store = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FeatureCache, (self.max_bytes, self.max_gram_bytes))

    def clear(self):
        self._store.clear()

    def nbytes(self):
        """Bytes of cached features (Gram matrices not included: see :meth:`gram_nbytes`)."""
        return sum(e["F"].numel() * e["F"].element_size() for e in self._store.values()
                   if e["F"] is not None)

    def gram_nbytes(self):
        return sum(G.numel() * G.element_size() for e in self._store.values()
                   for G in e.get("grams", {}).values())

    def gram(self, key, hx, hf, k):
        """Unscaled trace Gram ``sum_m F_x[:, m, :k] F_f[:, m, :k]^T`` (n_x, n_f) and the
        unscaled diagonal of ``x``, for samples given by their hashes (from
        :meth:`get`), or ``None`` when they are not all cached or the Gram would exceed
        ``max_gram_bytes``.

        One Gram over every cached sample is kept per projection size; a larger size adds only
        the new rows' contribution to the nearest smaller one (projections are nested), and new
        samples add only their rows.  So a grid search over projection sizes and CV folds costs
        about one Gram of all samples at the largest size, instead of one per fold and size.
        """
        with self._lock:
            e = self._store.get(key)
            if e is None or e["F"] is None or k > e["k"]:
                return None
            idx = e["index"]
            if any(h not in idx for h in hx) or any(h not in idx for h in hf):
                return None
            N = e["F"].shape[0]
            grams = e.setdefault("grams", {})
            isz = e["F"].element_size()
            if k not in grams and self.gram_nbytes() + N * N * isz > (self.max_gram_bytes or 0):
                return None
            G = self._gram_at(e, k)
            ix = torch.as_tensor([idx[h] for h in hx], device=G.device)
            jf = torch.as_tensor([idx[h] for h in hf], device=G.device)
            return G.index_select(0, ix).index_select(1, jf), G.diagonal()[ix]

    def sq_norms(self, key, hashes, k):
        """Unscaled squared norms ``|F[i, :, :k]|^2`` of cached samples given by their hashes
        (the trace Gram's diagonal), kept per projection size for every cached sample."""
        with self._lock:
            e = self._store[key]
            norms = e.setdefault("norms", {})
            N = e["F"].shape[0]
            have = norms.get(k)
            if have is None or have.shape[0] < N:
                n0 = 0 if have is None else have.shape[0]
                new = torch.linalg.vector_norm(e["F"][n0:, :, :k], dim=(1, 2)) ** 2
                norms[k] = new if have is None else torch.cat([have, new])
            ix = torch.as_tensor([e["index"][h] for h in hashes], device=e["F"].device)
            return norms[k].index_select(0, ix)

    def _gram_at(self, e, k):
        """The Gram at size k over all cached rows (extended to new rows as needed)."""
        F, grams = e["F"], e["grams"]
        if k in grams:
            G = _extend_gram(grams[k], F, k)
        else:
            lower = [kk for kk in grams if kk < k]
            if lower:  # nested: add the contribution of rows kk:k to the Gram at kk
                kk = max(lower)
                grams[kk] = _extend_gram(grams[kk], F, kk)
                G = sym_gram(F[..., kk:k].flatten(1), base=grams[kk])
            else:
                G = sym_gram(F[..., :k].flatten(1))
        grams[k] = G
        return G

    def get(self, key, X, k, compute, return_hashes=False, gather=True):
        """Features (n, m, k) of ``X`` (unscaled), computing what is missing.

        ``compute(X_rows, start, k)`` must return the unscaled features of rows
        ``start:start + k`` of the nested projection for the given samples.  With
        ``return_hashes=True`` also returns the samples' content hashes (for :meth:`gram` and
        :meth:`take`); ``gather=False`` only makes sure the rows are cached and returns None
        for the features.  The features are a view of the cache when ``X`` is the cached rows
        in order (do not modify them), a new tensor otherwise.
        """
        hashes = _row_hashes(X)
        self._ensure(key, X, k, compute, hashes)
        F = self.take(key, hashes, k) if gather else None
        return (F, hashes) if return_hashes else F

    def take(self, key, hashes, k):
        """The cached features (n, m, k) of samples given by their hashes (see :meth:`get`)."""
        with self._lock:
            e = self._store[key]
            pos = [e["index"][h] for h in hashes]
            F = e["F"][..., :k]
            if pos == list(range(F.shape[0])):
                return F
            return F.index_select(0, torch.as_tensor(pos, device=F.device))

    def _ensure(self, key, X, k, compute, hashes):
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


def _extend_gram(G, F, k):
    """Extend the Gram ``G`` of the first rows of ``F`` (at size k) to all of F's rows."""
    N, N0 = F.shape[0], G.shape[0]
    if N0 == N:
        return G
    A = F[..., :k].flatten(1)
    B = A[N0:] @ A.T  # (N - N0, N)
    out = torch.empty(N, N, dtype=G.dtype, device=G.device)
    out[:N0, :N0] = G
    out[N0:] = B
    out[:N0, N0:] = B[:, :N0].T
    return out


def _concat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    return np.concatenate([a, b])
