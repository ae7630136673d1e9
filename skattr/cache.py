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
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (FeatureCache, (self.max_bytes, self.max_gram_bytes))

    def clear(self):
        with self._lock:
            self._store.clear()

    def nbytes(self):
        """Bytes of cached features (Gram matrices not included: see :meth:`gram_nbytes`)."""
        return sum(b.numel() * b.element_size() for e in self._store.values()
                   for _, _, b in e["blocks"])

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
            if e is None or not e["blocks"] or k > e["k"]:
                return None
            idx = e["index"]
            if any(h not in idx for h in hx) or any(h not in idx for h in hf):
                return None
            N = _n_rows(e)
            grams = e.setdefault("grams", {})
            isz = e["blocks"][0][2].element_size()
            if k not in grams and self.gram_nbytes() + N * N * isz > (self.max_gram_bytes or 0):
                return None
            G = self._gram_at(e, k)
            ix, jf = _positions(e, hx, G.device), _positions(e, hf, G.device)
            return G.index_select(0, ix).index_select(1, jf), G.diagonal()[ix]

    def _norms_at(self, e, k):
        """Unscaled squared norms ``|F[i, :, :k]|^2`` (the trace Gram's diagonal) of every cached
        row, kept per size and extended to new rows as needed."""
        norms = e.setdefault("norms", {})
        have = norms.get(k)
        n0 = 0 if have is None else have.shape[0]
        if n0 < _n_rows(e):
            new = sum(torch.linalg.vector_norm(P[n0:], dim=(1, 2)) ** 2 for P in _pieces(e, 0, k))
            norms[k] = new if have is None else torch.cat([have, new])
        return norms[k]

    def _gram_at(self, e, k):
        """The Gram at size k over all cached rows (extended to new rows as needed)."""
        grams = e["grams"]
        if k in grams:
            G = _extend_gram(grams[k], e, k)
        else:
            lower = [kk for kk in grams if kk < k]
            G, k0 = None, 0
            if lower:  # nested: add the contribution of rows kk:k to the Gram at kk
                k0 = max(lower)
                G = grams[k0] = _extend_gram(grams[k0], e, k0)
            for P in _pieces(e, k0, k):  # whole column blocks flatten without a copy
                G = sym_gram(P.flatten(1), base=G)
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
        with self._lock:
            self._ensure(key, X, k, compute, hashes)
            F = self.take(key, hashes, k) if gather else None
        return (F, hashes) if return_hashes else F

    def take(self, key, hashes, k):
        """The cached features (n, m, k) of samples given by their hashes (see :meth:`get`)."""
        return gather_rows(*self.rows_view(key, hashes, k))

    def fit_view(self, key, X, k, compute):
        """In one locked step: cache the rows of ``X`` and return ``(hashes, view, norms,
        keep)``: ``view`` as from :meth:`rows_view`, the rows' unscaled squared feature norms
        (the trace Gram's diagonal), and whether the view is worth keeping instead of gathering it now
        (the rows are at least half of the cached rows: a view keeps its blocks alive)."""
        hashes = _row_hashes(X)
        with self._lock:
            self._ensure(key, X, k, compute, hashes)
            e = self._store[key]
            pieces, pos = view = self._view(e, hashes, k)
            norms = self._norms_at(e, k)
            norms = norms if pos is None else norms[pos]
            return hashes, view, norms, 2 * len(hashes) >= _n_rows(e)

    def rows_view(self, key, hashes, k):
        """``(pieces, pos)``: views of the cached column blocks covering ``:k`` and the cached
        rows of the given samples (``None`` when they are all cached rows, in order).  The
        views stay valid after :meth:`clear` (they keep their blocks alive);
        :func:`gather_rows` turns them into features."""
        with self._lock:
            return self._view(self._store[key], hashes, k)

    @staticmethod
    def _view(e, hashes, k):
        pieces = list(_pieces(e, 0, k))
        pos = [e["index"][h] for h in hashes]
        if pos == list(range(_n_rows(e))):
            return pieces, None
        return pieces, torch.as_tensor(pos, device=pieces[0].device)

    def _ensure(self, key, X, k, compute, hashes):
        with self._lock:
            e = self._store.get(key)
            if e is None:
                e = {"index": {}, "blocks": [], "k": 0}
                self._store[key] = e
            # extend every cached row to k features if needed (nested rows: only the new ones);
            # the new columns are a block of their own, nothing cached is copied
            if e["blocks"] and k > e["k"]:
                ext = compute(e["rows"], e["k"], k - e["k"])
                e["blocks"].append((e["k"], k, ext.to(e["blocks"][0][2].device)))
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
                base = _n_rows(e)
                for j, i in enumerate(missing):
                    e["index"][uniq[i]] = base + j
                if not e["blocks"]:
                    e["blocks"], e["rows"] = [(0, kk, newF)], sel
                else:
                    # (cached rows were extended to k above, so the blocks cover every column)
                    e["blocks"] = [(c0, c1, torch.cat([b, newF[..., c0:c1].to(b.device)]))
                                   for c0, c1, b in e["blocks"]]
                    e["rows"] = _concat(e["rows"], sel)
                e["k"] = kk
                if self.max_bytes is not None and self.nbytes() > self.max_bytes:
                    raise MemoryError(
                        f"FeatureCache holds {self.nbytes() / 2**20:.1f} MiB, more than "
                        f"max_bytes={self.max_bytes}; use a larger max_bytes or clear() it."
                    )
            self.hits += len(hashes) - len(missing)


def gather_rows(pieces, pos):
    """Features (n, m, k) from :meth:`FeatureCache.rows_view`: a view of the cache for one
    block and rows in order, a new tensor otherwise."""
    if pos is not None:
        pieces = [P.index_select(0, pos) for P in pieces]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def _positions(e, hashes, device):
    return torch.as_tensor([e["index"][h] for h in hashes], device=device)


def _n_rows(e):
    return e["blocks"][0][2].shape[0] if e["blocks"] else 0


def _pieces(e, c0, c1):
    """Views (N, m, .) of the cached column blocks covering columns ``c0:c1``, in order."""
    for b0, b1, B in e["blocks"]:
        lo, hi = max(b0, c0), min(b1, c1)
        if lo < hi:
            yield B[..., lo - b0 : hi - b0]


def _extend_gram(G, e, k):
    """Extend the Gram ``G`` of the first cached rows (at size k) to every cached row."""
    N, N0 = _n_rows(e), G.shape[0]
    if N0 == N:
        return G
    B = None  # (N - N0, N): the new rows against all rows
    for P in _pieces(e, 0, k):
        A = P.flatten(1)
        B = A[N0:] @ A.T if B is None else B.addmm_(A[N0:], A.T)
    out = torch.empty(N, N, dtype=G.dtype, device=G.device)
    out[:N0, :N0] = G
    out[N0:] = B
    out[:N0, N0:] = B[:, :N0].T
    return out


def _concat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    return np.concatenate([a, b])
