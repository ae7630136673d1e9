"""An out-of-core feature store: per-block ``.npy`` files behind a JSON manifest.

Attribution methods that featurise a large training set (:class:`skattr.estimators.trak.TRAK`)
write their features here block by block.  Every block is an ordinary ``.npy`` file written to a
temporary name and renamed into place, and the manifest lists the finished blocks, so

* features larger than memory live on disk and are read back one block at a time as memory maps
  (scoring never holds more than one block of features);
* an interrupted featurisation resumes: re-opening the same store skips every finished block,
  and a block whose file is missing or damaged is detected and recomputed;
* a store records what it was built from (``meta``), and :meth:`FeatureStore.for_config` keys
  the directory by a hash of that description, so two different settings never share one.

One writer at a time: the store is not safe for concurrent writers.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from ._fingerprint import config_key

__all__ = ["FeatureStore", "MemoryStore", "config_key"]

_FORMAT = "skattr-feature-store"
_VERSION = 1


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


class FeatureStore(BlockLayout):
    """Per-model feature blocks ``(rows, dim)`` with a per-row scalar, on disk.

    Parameters
    ----------
    path : str or path-like
        Directory of the store (created if needed).  If it already holds a store, that store is
        re-opened: its shape must match, and its finished blocks are kept.
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
    """

    def __init__(self, path, *, n_rows, dim, n_models, block_size, dtype="float32", meta=None):
        self.path = Path(path)
        self.n_rows, self.dim = int(n_rows), int(dim)
        self.n_models, self.block_size = int(n_models), int(block_size)
        self.dtype = np.dtype(dtype).name
        self.meta = meta if meta is None else json.loads(json.dumps(meta, default=str))
        if min(self.n_rows, self.dim, self.n_models, self.block_size) < 1:
            raise ValueError(
                "n_rows, dim, n_models and block_size must be positive, got "
                f"{(self.n_rows, self.dim, self.n_models, self.block_size)}."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest_path = self.path / "manifest.json"
        self._open()

    # ------------------------------------------------------------------ creation / validation
    @classmethod
    def for_config(cls, root, config, **kwargs):
        """Open the store for ``config`` under ``root`` (in ``root/<hash of config>``)."""
        return cls(Path(root) / f"store-{config_key(config)}", meta=config, **kwargs)

    def _header(self):
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "n_rows": self.n_rows,
            "dim": self.dim,
            "n_models": self.n_models,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "meta": self.meta,
        }

    def _open(self):
        if self._manifest_path.exists():
            try:
                man = json.loads(self._manifest_path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"The feature store manifest {self._manifest_path} cannot be read ({exc}); "
                    "delete the directory to start over."
                ) from exc
            head = self._header()
            if man.get("format") != _FORMAT:
                raise ValueError(f"{self.path} is not a skattr feature store.")
            diff = [k for k in head if k != "version" and man.get(k) != head[k]]
            if diff:
                k = diff[0]
                raise ValueError(
                    f"The feature store at {self.path} was created with {k}={man.get(k)!r}, "
                    f"not {head[k]!r}; use another directory (or delete this one)."
                )
            self._done = {int(m): set(map(int, b)) for m, b in man.get("done", {}).items()}
        else:
            self._done = {}
            self._write_manifest()
        for tmp in self.path.glob("*.tmp"):  # leftovers of an interrupted write
            try:
                tmp.unlink()
            except OSError:  # pragma: no cover
                pass

    def _write_manifest(self):
        man = self._header()
        man["done"] = {str(m): sorted(b) for m, b in sorted(self._done.items())}
        _atomic_write_text(self._manifest_path, json.dumps(man, indent=1))

    # ------------------------------------------------------------------ blocks
    def _file(self, m, b, what="f"):
        return self.path / f"m{m:03d}_b{b:06d}.{what}.npy"

    def _valid(self, m, b):
        r0, r1 = self.block_range(b)
        try:
            F = np.load(self._file(m, b, "f"), mmap_mode="r")
            q = np.load(self._file(m, b, "q"), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return False
        return F.shape == (r1 - r0, self.dim) and q.shape == (r1 - r0,) and F.dtype == self.dtype

    def done(self, m, b, verify=True):
        """Whether block ``b`` of model ``m`` is finished (and, with ``verify``, readable)."""
        if b not in self._done.get(m, ()):
            return False
        if verify and not self._valid(m, b):
            warnings.warn(
                f"Feature store block (model {m}, block {b}) at {self.path} is missing or "
                "damaged; it will be recomputed."
            )
            self._done[m].discard(b)
            self._write_manifest()
            return False
        return True

    def missing(self, m=None):
        """``[(model, block), ...]`` still to compute (all models, or model ``m``)."""
        models = range(self.n_models) if m is None else [m]
        return [(mm, b) for mm in models for b in range(self.n_blocks) if not self.done(mm, b)]

    def complete(self):
        return not self.missing()

    def rows(self, m, b):
        """None: blocks are featurised in memory, then written with :meth:`write`."""
        return None

    def write(self, m, b, features, q):
        """Store the features ``(rows, dim)`` and per-row scalars ``(rows,)`` of one block."""
        r0, r1 = self.block_range(b)
        F = np.asarray(features, dtype=self.dtype)
        q = np.asarray(q, dtype=self.dtype).reshape(-1)
        if F.shape != (r1 - r0, self.dim) or q.shape != (r1 - r0,):
            raise ValueError(
                f"Block {b} needs features of shape {(r1 - r0, self.dim)} and {r1 - r0} scalars, "
                f"got {F.shape} and {q.shape}."
            )
        _atomic_save(self._file(m, b, "q"), q)
        _atomic_save(self._file(m, b, "f"), F)
        self._done.setdefault(m, set()).add(b)
        self._write_manifest()

    def read(self, m, b, mmap=True):
        """``(features, q)`` of block ``b`` of model ``m`` (read-only memory maps by default)."""
        if not self.done(m, b, verify=False):
            raise ValueError(f"Block {b} of model {m} has not been computed (store {self.path}).")
        mode = "r" if mmap else None
        return np.load(self._file(m, b, "f"), mmap_mode=mode), np.load(self._file(m, b, "q"), mmap_mode=mode)

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

    def nbytes(self):
        """Bytes of feature blocks on disk."""
        return sum(f.stat().st_size for f in self.path.glob("m*_b*.npy"))

    def clear(self):
        """Delete the store directory."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self):
        done = sum(len(v) for v in self._done.values())
        return (
            f"FeatureStore({str(self.path)!r}, n_rows={self.n_rows}, dim={self.dim}, "
            f"n_models={self.n_models}, blocks done={done}/{self.n_blocks * self.n_models})"
        )

    # a pickled store re-opens its directory
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_done"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._manifest_path.exists():
            man = json.loads(self._manifest_path.read_text())
            self._done = {int(m): set(map(int, b)) for m, b in man.get("done", {}).items()}
        else:
            self._done = {}


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
