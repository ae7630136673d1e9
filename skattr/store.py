"""Out-of-core block stores: per-block ``.npy`` files, each finished block marked by its own file.

Attribution methods that featurise a large training set (:class:`skattr.estimators.trak.TRAK`)
write their features into a :class:`FeatureStore` block by block, and
``attribute(X, out=path)`` writes its scores into a :class:`ScoreStore`.  Each block is written by
one worker, with no shared state:

1. its arrays are written to temporary names unique to the writer and renamed into place
   (``os.replace``: atomic on a local disk and on a shared file system such as NFS or Lustre,
   within one directory);
2. then a small completion marker ``<block>.done`` (JSON: row range, file sizes, writer) is
   written the same way.

A block is finished when its marker exists and its files match the marker, so

* many workers (processes, Dask workers on other machines sharing the folder) write one store at
  once; there is no manifest that every writer rewrites, and two workers that compute the same
  block (a task retried after its worker was presumed dead) write the same bytes;
* a featurisation interrupted anywhere (a killed worker, a crash) resumes: finished blocks are
  kept and never recomputed, and a block whose file is missing or damaged is detected (at fit:
  recomputed, with a warning; at read: a ``ValueError`` naming the block and the folder);
* a store records what it was built from (``meta``) in ``manifest.json``, written once; a folder
  written by another configuration is refused with an error naming the folder and the first
  differing setting, and :meth:`FeatureStore.for_config` keys the folder by a hash of that
  description, so two different settings never share one.

``.npy`` blocks are read back as memory maps, one block at a time.  (zarr would add chunked
compression; it is not a dependency, and a ``.npy`` block is already one contiguous read.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._fingerprint import config_key

__all__ = ["FeatureStore", "MemoryStore", "ScoreStore", "TopK", "config_key", "writer_id"]

_FORMAT = "skattr-feature-store"
_SCORE_FORMAT = "skattr-score-store"
_VERSION = 2
_STALE_TMP_S = 600.0  # a temporary file older than this is a leftover of an interrupted write


def writer_id():
    """``host:pid`` of this process (recorded in the completion markers it writes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _tmp_name(path: Path) -> Path:
    # unique per writer: two workers writing the same block never share a temporary file
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # pragma: no cover - the write failed midway
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # pragma: no cover
            tmp.unlink()


class BlockLayout:
    """Rows ``0:n_rows`` split into blocks of ``block_size`` (shared by the feature stores)."""

    n_rows: int
    block_size: int

    @property
    def n_blocks(self):
        return -(-self.n_rows // self.block_size)

    def block_range(self, b):
        """``(start, stop)`` rows of block ``b``."""
        r0 = b * self.block_size
        return r0, min(self.n_rows, r0 + self.block_size)


class _BlockDir(BlockLayout):
    """A folder of blocks ``(m, b)``, each a few named ``.npy`` arrays plus a completion marker.

    Subclasses set ``_format``, ``_arrays`` (the array names of a block) and ``_shapes(m, b)``.
    """

    _format = ""
    _arrays = ()
    _kind = "block store"
    _redo = "fit again"  # what recomputes a block, in error messages

    def _header(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_dir(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest_path = self.path / "manifest.json"
        self._open()

    # ------------------------------------------------------------------ header
    def _read_manifest(self):
        try:
            return json.loads(self._manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"The {self._kind} manifest {self._manifest_path} cannot be read ({exc}); "
                "delete the folder to start over."
            ) from exc

    def _check_header(self, man):
        head = self._header()
        if man.get("format") != self._format:
            raise ValueError(f"{self.path} is not a skattr {self._kind} (format {man.get('format')!r}).")
        diff = [k for k in head if k != "version" and man.get(k) != head[k]]
        if diff:
            k = diff[0]
            was, now = man.get(k), head[k]
            if isinstance(was, dict) and isinstance(now, dict):  # name the settings that differ
                keys = sorted(set(was) | set(now), key=str)
                parts = ["targets: other X / y" if j == "targets" else
                         f"{j}={was.get(j)!r}, now {now.get(j)!r}"
                         for j in keys if was.get(j) != now.get(j)]
                raise ValueError(
                    f"The {self._kind} at {self.path} was created for other {k} "
                    f"({'; '.join(parts)}); use another folder (or delete this one).")
            raise ValueError(
                f"The {self._kind} at {self.path} was created with {k}={was!r}, "
                f"not {now!r}; use another folder (or delete this one)."
            )

    def _open(self):
        self._done = set()
        if self._manifest_path.exists():
            man = self._read_manifest()
            self._check_header(man)
            if man.get("version", 1) < 2 and man.get("done"):
                self._scan()
                self._upgrade_v1(man["done"])
        else:
            man = self._header()
            _atomic_write_text(self._manifest_path, json.dumps(man, indent=1))
            # two writers creating one folder at once: the one whose header landed wins, the
            # other is refused here if its configuration differs
            self._check_header(self._read_manifest())
        self.cleanup(_STALE_TMP_S)
        self._scan()

    def _upgrade_v1(self, done):
        """A version-1 store listed its finished blocks in the manifest: mark them."""
        for m, blocks in done.items():
            for b in blocks:
                if not self._marker(int(m), int(b)).exists() and self._valid(int(m), int(b)):
                    self._mark(int(m), int(b))
        _atomic_write_text(self._manifest_path, json.dumps(self._header(), indent=1))

    def cleanup(self, older_than=0.0):
        """Delete temporary files of interrupted writes older than ``older_than`` seconds
        (the default when a store is opened, 600 s, spares writes in progress elsewhere)."""
        now = time.time()
        for tmp in self.path.glob("*.tmp"):
            try:
                if now - tmp.stat().st_mtime >= older_than:
                    tmp.unlink()
            except OSError:  # pragma: no cover - removed by another process
                pass

    # ------------------------------------------------------------------ markers
    def _file(self, m, b, what):
        return self.path / f"m{m:03d}_b{b:06d}.{what}.npy"

    def _marker(self, m, b):
        return self.path / f"m{m:03d}_b{b:06d}.done"

    def _scan(self):
        """Re-read which blocks are marked finished (one directory listing)."""
        done = set()
        with os.scandir(self.path) as it:
            for e in it:
                name = e.name
                if name.endswith(".done") and name.startswith("m"):
                    try:
                        m, b = name[:-5].split("_b")
                        done.add((int(m[1:]), int(b)))
                    except ValueError:  # pragma: no cover - a foreign file
                        continue
        self._done = done
        return done

    def _mark(self, m, b):
        files = {w: self._file(m, b, w).stat().st_size for w in self._arrays}
        r0, r1 = self.block_range(b)
        info = {"model": m, "block": b, "rows": [r0, r1], "bytes": files,
                "writer": writer_id(), "token": uuid.uuid4().hex, "time": time.time()}
        _atomic_write_text(self._marker(m, b), json.dumps(info))
        self._done.add((m, b))

    def marker(self, m, b):
        """The completion marker of block ``b`` of model ``m`` (dict), or None if unfinished:
        row range, file sizes, the writer (``host:pid``) and a token unique to the write."""
        try:
            return json.loads(self._marker(m, b).read_text())
        except (OSError, ValueError):
            return None

    def _valid(self, m, b, info=None):
        """Whether the block's files exist, are readable and have the expected shapes (and,
        given its marker, the sizes it recorded)."""
        shapes = self._shapes(m, b)
        try:
            for w in self._arrays:
                p = self._file(m, b, w)
                A = np.load(p, mmap_mode="r")
                if A.shape != shapes[w] or A.dtype != self.dtype:
                    return False
                if info is not None and info.get("bytes", {}).get(w, p.stat().st_size) != p.stat().st_size:
                    return False
        except (OSError, ValueError, EOFError):
            return False
        return True

    def done(self, m, b, verify=True):
        """Whether block ``b`` of model ``m`` is finished (and, with ``verify``, readable); a
        marked block whose files are missing or damaged loses its marker (with a warning), so
        it is recomputed."""
        if (m, b) not in self._done:
            if not self._marker(m, b).exists():
                return False
            self._done.add((m, b))  # finished by another writer since the last look
        if verify and not self._valid(m, b, self.marker(m, b)):
            warnings.warn(
                f"{self._kind.capitalize()} block (model {m}, block {b}) at {self.path} is missing "
                "or damaged; it will be recomputed."
            )
            self._unmark(m, b)
            return False
        return True

    def _unmark(self, m, b):
        try:
            self._marker(m, b).unlink()
        except OSError:  # pragma: no cover - already removed
            pass
        self._done.discard((m, b))

    def _models(self):
        return range(1)

    def missing(self, m=None, verify=True):
        """``[(model, block), ...]`` still to compute (all models, or model ``m``), from a fresh
        look at the folder (other workers may have finished blocks)."""
        self._scan()
        models = self._models() if m is None else [m]
        return [(mm, b) for mm in models for b in range(self.n_blocks) if not self.done(mm, b, verify)]

    def complete(self):
        return not self.missing()

    def _save_block(self, m, b, arrays):
        for w in self._arrays:  # data first, the marker last
            _atomic_save(self._file(m, b, w), arrays[w])
        self._mark(m, b)

    def _load(self, m, b, what, mmap=True):
        """One array of a finished block; a clear error naming the block when it is not."""
        if (m, b) not in self._done and not self._marker(m, b).exists():
            raise ValueError(
                f"Block {b} of model {m} (rows {self.block_range(b)}) has not been computed "
                f"({self._kind} {self.path})."
            )
        try:
            A = np.load(self._file(m, b, what), mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(
                f"{self._kind.capitalize()} block (model {m}, block {b}, rows "
                f"{self.block_range(b)}) at {self.path} is missing or damaged ({exc}); {self._redo} "
                "to recompute it (finished blocks are kept)."
            ) from exc
        shape = self._shapes(m, b)[what]
        if A.shape != shape:
            raise ValueError(
                f"{self._kind.capitalize()} block (model {m}, block {b}) at {self.path} has shape "
                f"{A.shape}, not {shape}: the folder is damaged; {self._redo} to recompute it."
            )
        return A

    # ------------------------------------------------------------------ misc
    def nbytes(self):
        """Bytes of blocks on disk."""
        return sum(f.stat().st_size for f in self.path.glob("m*_b*.npy"))

    def clear(self):
        """Delete the store folder."""
        shutil.rmtree(self.path, ignore_errors=True)

    # a pickled store (sent to a worker) re-reads the folder's markers; it does not re-create
    # or clean the folder
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_done"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._done = set()
        if self.path.exists():
            self._scan()


class FeatureStore(_BlockDir):
    """Per-model feature blocks ``(rows, dim)`` with a per-row scalar, on disk; many writers.

    Parameters
    ----------
    path : str or path-like
        Folder of the store (created if needed; a local disk or a file system shared by the
        workers).  If it already holds a store, that store is re-opened: its settings must
        match, and its finished blocks are kept.
    n_rows : int
        Number of rows (training examples).
    dim : int
        Feature dimension.
    n_models : int
        Number of feature sets (one per ensemble member).
    block_size : int
        Rows per block.
    dtype : {"float32", "float64"}, default="float32"
    meta : dict, default=None
        A JSON-serialisable description of what the features are; a re-opened store must have
        the same ``meta``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from skattr.store import FeatureStore
    >>> d = tempfile.mkdtemp()
    >>> st = FeatureStore(d, n_rows=5, dim=3, n_models=1, block_size=2)
    >>> st.missing()
    [(0, 0), (0, 1), (0, 2)]
    >>> st.write(0, 0, np.ones((2, 3)), np.zeros(2))
    >>> FeatureStore(d, n_rows=5, dim=3, n_models=1, block_size=2).missing()
    [(0, 1), (0, 2)]
    >>> st.marker(0, 0)["rows"]
    [0, 2]
    """

    _format = _FORMAT
    _arrays = ("q", "f")
    _kind = "feature store"

    def __init__(self, path, *, n_rows, dim, n_models, block_size, dtype="float32", meta=None):
        self.n_rows, self.dim = int(n_rows), int(dim)
        self.n_models, self.block_size = int(n_models), int(block_size)
        self.dtype = np.dtype(dtype).name
        self.meta = meta if meta is None else json.loads(json.dumps(meta, default=str))
        if min(self.n_rows, self.dim, self.n_models, self.block_size) < 1:
            raise ValueError(
                "n_rows, dim, n_models and block_size must be positive, got "
                f"{(self.n_rows, self.dim, self.n_models, self.block_size)}."
            )
        self._init_dir(path)

    @classmethod
    def for_config(cls, root, config, **kwargs):
        """Open the store for ``config`` under ``root`` (in ``root/<hash of config>``)."""
        return cls(Path(root) / f"store-{config_key(config)}", meta=config, **kwargs)

    def _header(self):
        return {
            "format": _FORMAT, "version": _VERSION, "n_rows": self.n_rows, "dim": self.dim,
            "n_models": self.n_models, "block_size": self.block_size, "dtype": self.dtype,
            "meta": self.meta,
        }

    def _shapes(self, m, b):
        r0, r1 = self.block_range(b)
        return {"f": (r1 - r0, self.dim), "q": (r1 - r0,)}

    def _models(self):
        return range(self.n_models)

    def rows(self, m, b):
        """None: blocks are featurised in memory, then written with :meth:`write`."""
        return None

    def write(self, m, b, features, q):
        """Store the features ``(rows, dim)`` and per-row scalars ``(rows,)`` of one block (safe
        to call from many processes at once, for different or equal blocks)."""
        r0, r1 = self.block_range(b)
        F = np.asarray(features, dtype=self.dtype)
        q = np.asarray(q, dtype=self.dtype).reshape(-1)
        if F.shape != (r1 - r0, self.dim) or q.shape != (r1 - r0,):
            raise ValueError(
                f"Block {b} needs features of shape {(r1 - r0, self.dim)} and {r1 - r0} scalars, "
                f"got {F.shape} and {q.shape}."
            )
        self._save_block(m, b, {"f": F, "q": q})

    def read(self, m, b, mmap=True):
        """``(features, q)`` of block ``b`` of model ``m`` (read-only memory maps by default);
        a ``ValueError`` naming the block and folder if it is missing or damaged."""
        return self._load(m, b, "f", mmap), self._load(m, b, "q", mmap)

    def iter_blocks(self, m, mmap=True):
        """Yield ``(start, stop, features, q)`` for every block of model ``m``."""
        for b in range(self.n_blocks):
            r0, r1 = self.block_range(b)
            F, q = self.read(m, b, mmap=mmap)
            yield r0, r1, F, q

    def q(self, m):
        """The per-row scalars of model ``m``, (n_rows,)."""
        return np.concatenate([np.asarray(q) for _, _, _, q in self.iter_blocks(m)])

    # ------------------------------------------------------------------ extra arrays
    def save_array(self, name, array):
        """Persist an auxiliary array (e.g. a Gram matrix) next to the blocks."""
        _atomic_save(self.path / f"{name}.npy", array)

    def load_array(self, name, mmap=True):
        """An auxiliary array saved with :meth:`save_array`, or None if absent or damaged."""
        p = self.path / f"{name}.npy"
        if not p.exists():
            return None
        try:
            return np.load(p, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError):
            return None

    def __repr__(self):
        return (
            f"FeatureStore({str(self.path)!r}, n_rows={self.n_rows}, dim={self.dim}, "
            f"n_models={self.n_models}, blocks done={len(self._done)}/{self.n_blocks * self.n_models})"
        )


class ScoreStore(_BlockDir):
    """An ``(n_targets, n_train)`` score matrix on disk, in column blocks of training examples.

    Written by ``attribute(X, y, out=path)`` (:class:`skattr.estimators.base.BaseAttributor`)
    when the matrix does not fit in memory; block ``b`` holds the scores of training examples
    ``block_range(b)`` for every target, and is written by one worker.

    Parameters
    ----------
    path : str or path-like
        Folder (created if needed; re-opened with the same settings, keeping finished blocks).
    n_targets : int
        Rows (target samples).
    n_train : int
        Columns (training examples).
    block_size : int
        Training examples per block.
    dtype : {"float32", "float64"}, default="float64"
    meta : dict, default=None
        What the scores are (the attributor's fingerprint and the targets'); a re-opened store
        must match it.

    Attributes
    ----------
    shape : tuple
        ``(n_targets, n_train)``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from skattr.store import ScoreStore
    >>> S = np.arange(10.0).reshape(2, 5)
    >>> st = ScoreStore(tempfile.mkdtemp(), n_targets=2, n_train=5, block_size=2)
    >>> for b in range(st.n_blocks):
    ...     c0, c1 = st.block_range(b)
    ...     st.write(b, S[:, c0:c1])
    >>> np.array_equal(np.asarray(st), S)
    True
    >>> st.top_k(2).proponents
    array([[4, 3],
           [4, 3]])
    """

    _format = _SCORE_FORMAT
    _arrays = ("s",)
    _kind = "score store"
    _redo = "call attribute(X, y, out=<this folder>) again"

    def __init__(self, path, *, n_targets, n_train, block_size, dtype="float64", meta=None):
        self.n_targets, self.n_rows = int(n_targets), int(n_train)
        self.block_size = int(block_size)
        self.dtype = np.dtype(dtype).name
        self.meta = meta if meta is None else json.loads(json.dumps(meta, default=str))
        if min(self.n_targets, self.n_rows, self.block_size) < 1:
            raise ValueError(
                "n_targets, n_train and block_size must be positive, got "
                f"{(self.n_targets, self.n_rows, self.block_size)}."
            )
        self._init_dir(path)

    @property
    def shape(self):
        return (self.n_targets, self.n_rows)

    def _header(self):
        return {
            "format": _SCORE_FORMAT, "version": _VERSION, "n_targets": self.n_targets,
            "n_train": self.n_rows, "block_size": self.block_size, "dtype": self.dtype,
            "meta": self.meta,
        }

    def _shapes(self, m, b):
        c0, c1 = self.block_range(b)
        return {"s": (self.n_targets, c1 - c0)}

    def write(self, b, scores):
        """Store the scores ``(n_targets, columns of block b)`` of block ``b``."""
        c0, c1 = self.block_range(b)
        S = np.asarray(scores, dtype=self.dtype)
        if S.shape != (self.n_targets, c1 - c0):
            raise ValueError(f"Score block {b} needs shape {(self.n_targets, c1 - c0)}, got {S.shape}.")
        self._save_block(0, b, {"s": S})

    def read(self, b, mmap=True):
        """Scores of block ``b``, ``(n_targets, columns)``."""
        return self._load(0, b, "s", mmap)

    def iter_blocks(self, mmap=True):
        """Yield ``(start, stop, scores)`` for every column block."""
        for b in range(self.n_blocks):
            c0, c1 = self.block_range(b)
            yield c0, c1, self.read(b, mmap)

    def to_numpy(self):
        """The whole matrix in memory (checked against the memory available)."""
        from ._validation import check_memory

        check_memory(self.n_targets * self.n_rows * np.dtype(self.dtype).itemsize,
                     f"The {self.n_targets} x {self.n_rows} score matrix",
                     hint="Read it block by block (iter_blocks) or use top_k.")
        out = np.empty(self.shape, dtype=self.dtype)
        for c0, c1, S in self.iter_blocks():
            out[:, c0:c1] = S
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.to_numpy()
        return out if dtype is None else out.astype(dtype)

    def top_k(self, k=10):
        """The ``k`` highest and lowest scores of each target, streamed block by block (as
        :meth:`skattr.estimators.base.BaseAttributor.top_k`; ties: lower index first)."""
        return top_k_blocks(((c0, S) for c0, _, S in self.iter_blocks()), self.n_targets,
                            self.n_rows, k)

    def __repr__(self):
        return (f"ScoreStore({str(self.path)!r}, shape={self.shape}, "
                f"blocks done={len(self._done)}/{self.n_blocks})")


class TopK(NamedTuple):
    """The ``k`` strongest proponents and opponents of each target, (n_samples, k) each."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def _merge_top(best_i, best_s, idx, S, k, sign):
    """Merge candidates into the running top ``k`` (by ``sign * score`` descending, ties by
    index ascending: the order of a stable sort of the whole row)."""
    if best_i is None:
        cand_i, cand_s = np.broadcast_to(idx, S.shape), S
    else:
        cand_i = np.concatenate([best_i, np.broadcast_to(idx, S.shape)], axis=1)
        cand_s = np.concatenate([best_s, S], axis=1)
    key = -sign * cand_s
    kk = min(k, key.shape[1])
    # per row, the entries at or above the kk-th best (a selection, O(width)); then only those
    # are sorted by (key, index) (lexsort's last key is the primary one)
    v = np.partition(key, kk - 1, axis=1)[:, kk - 1 : kk]
    rows, cols = np.nonzero(key <= v)
    ci = np.broadcast_to(cand_i, key.shape)[rows, cols]
    order = np.lexsort((ci, key[rows, cols], rows))
    rows, cols, ci = rows[order], cols[order], ci[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=key.shape[0]))[:-1]])
    sel = starts[:, None] + np.arange(kk)[None, :]  # every row has at least kk candidates
    return ci[sel], cand_s[rows[sel], cols[sel]]


def top_k_blocks(blocks, n_targets, n_cols, k):
    """Top-``k`` proponents and opponents from column blocks ``(start, scores)`` of an
    ``(n_targets, n_cols)`` matrix, holding ``O(n_targets * (k + block))`` at a time; returns
    :class:`TopK`."""
    k = int(k)
    if not 1 <= k <= n_cols:
        raise ValueError(f"k must lie in [1, n_train={n_cols}], got {k}.")
    pi = ps = oi = os_ = None
    for c0, S in blocks:
        S = np.asarray(S)
        idx = np.arange(c0, c0 + S.shape[1])[None, :]
        pi, ps = _merge_top(pi, ps, idx, S, k, 1.0)
        oi, os_ = _merge_top(oi, os_, idx, S, k, -1.0)
    return TopK(np.ascontiguousarray(pi), np.ascontiguousarray(ps),
                np.ascontiguousarray(oi), np.ascontiguousarray(os_))
class MemoryStore(BlockLayout):
    """The :class:`FeatureStore` interface over arrays in memory (one block per model)."""

    def __init__(self, n_rows, dim, n_models, block_size, dtype):
        self.n_rows, self.dim, self.n_models = n_rows, dim, n_models
        self.block_size = block_size
        self.dtype = np.dtype(dtype).name
        self.F = [np.empty((n_rows, dim), dtype=dtype) for _ in range(n_models)]
        self.Q = [np.empty(n_rows, dtype=dtype) for _ in range(n_models)]
        self._done = [set() for _ in range(n_models)]
        self.arrays = {}

    def missing(self, m=None):
        models = range(self.n_models) if m is None else [m]
        return [(mm, b) for mm in models for b in range(self.n_blocks) if b not in self._done[mm]]

    def rows(self, m, b):
        """The arrays that block ``b`` of model ``m`` is featurised into (views)."""
        r0, r1 = self.block_range(b)
        return self.F[m][r0:r1], self.Q[m][r0:r1]

    def write(self, m, b, F, q):
        Fv, qv = self.rows(m, b)
        if not np.may_share_memory(F, Fv):  # rows featurised elsewhere, not in place
            Fv[...] = F
        if not np.may_share_memory(q, qv):
            qv[...] = q
        self._done[m].add(b)

    def iter_blocks(self, m, mmap=True):
        # one block: the whole matrix (it is in memory anyway)
        yield 0, self.n_rows, self.F[m], self.Q[m]

    def q(self, m):
        return self.Q[m]

    def save_array(self, name, a):
        self.arrays[name] = a

    def load_array(self, name, mmap=True):
        return self.arrays.get(name)
