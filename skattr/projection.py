"""Seeded, nested random projections of per-example gradients.

Every projection here is a k x p matrix ``P`` whose rows are drawn independently, row block by
row block, from a generator seeded by ``(random_state, parameter name, block index)``.  Hence

* the same ``random_state`` gives the same matrix in any process, for any batch or chunk size;
* projections are **nested**: the first ``k`` rows of a ``k'``-row projection (``k < k'``) are the
  ``k``-row projection, so features computed once at the largest size serve every smaller size;
* no dense ``p x k`` matrix is ever held when it would be large: dense rows are generated block by
  block on the fly, sparse rows are stored as indices, factored rows as two small factors.

Rows have unit-variance entries, so ``E[(r . g)^2] = |g|^2``; features are divided by ``sqrt(k)``
when used (:func:`scale_features`), which keeps ``<P g, P g'> / k`` an unbiased estimate of
``<g, g'>`` for every k.

Kinds
-----
``"rademacher"``
    Entries +-1 (the eNTK paper's choice).
``"gaussian"``
    Entries N(0, 1) (TRAK's choice).
``"sparse"``
    Very sparse rows (Li, Hastie and Church, 2006): ``s = ceil(sqrt(p))`` random coordinates per row,
    random signs, scaled by ``sqrt(p / s)``.  Cost ``O(k sqrt(p))`` per example instead of
    ``O(k p)``.
``"factored"``
    For a weight matrix whose per-example gradient is ``sum_s delta_s a_s^T`` (Linear, Conv), row
    ``r`` is ``u_r (x) v_r`` with ``u_r, v_r ~ N(0, I)``: the feature is ``sum_s (u_r . delta_s)
    (v_r . a_s)``, computed from the (input, output-gradient) pair without forming the gradient.
    Cost ``O(k (d_in + d_out))`` per example and layer.  Its variance is higher (for ``g = g'``,
    ``Var = 8|g|^4`` instead of ``2|g|^4`` for a Gaussian row), so it needs about 4x the rows for
    the same accuracy; it is much faster for wide layers.  A Linear/Conv bias whose weight is
    selected too is folded in as a last input column of ones; other parameters (norm layers, a
    bias alone) and every parameter under the ``vmap`` engine use Gaussian rows, as does a Conv
    layer whose per-example gradient is small and cheaper to form than to project factor by
    factor (decided from the layer's shape in :func:`skattr.gradients.project`).

``"kronecker"``
    Like ``"factored"``, but rows come in blocks of ``KRON_SIDE**2 = 16``: row ``(b, i, j)`` is
    ``u_{b,i} (x) v_{b,j}`` for 4 u and 4 v vectors per block (16 blocks interleaved per 256
    rows, block index fastest), so the cost is
    ``O(k (d_in + d_out) / 4)`` per example and layer.  Rows sharing a vector are correlated:
    the variance is higher still (for ``g = g'`` and a rank-one gradient ``Var = 20|g|^4/k``
    against ``8|g|^4/k``).  For gradients whose two sides both vary (TRAK's margin) it needs
    about 1.3x the rows of ``"factored"`` for the same accuracy at 4x less cost per row; when one
    side is nearly constant (the one-hot output gradients of a trace NTK's last layer) it acts
    like ``k / 4`` rows and is no faster at equal accuracy.

Projected features depend on the gradient engine: the structured engine groups a layer's weight
and bias under one key, the ``vmap`` engine keys each parameter separately, so the two engines
draw different (equally valid) projections from the same ``random_state``.
"""

from __future__ import annotations

import math
import warnings
import zlib

import torch

from . import _memory

__all__ = ["KINDS", "STRUCTURED", "ROW_BLOCK", "Projector", "scale_features"]

KINDS = ("rademacher", "gaussian", "sparse", "factored", "kronecker")
STRUCTURED = ("factored", "kronecker")  # kinds projecting (input, output-gradient) pairs
KRON_SIDE = 4  # "kronecker": blocks of KRON_SIDE x KRON_SIDE rows from KRON_SIDE u and v vectors
_KRON_SUPER = 256  # rows per kronecker super-block (16 blocks, interleaved; part of the definition)
_KRON_VECS = _KRON_SUPER // KRON_SIDE  # u (and v) vectors per super-block
_KRON_BLOCKS = _KRON_SUPER // (KRON_SIDE * KRON_SIDE)  # blocks per super-block
ROW_BLOCK = 128  # rows generated per seeded block; part of the projection's definition
# Dense rows kept in memory: at most this share of the memory budget per parameter group and
# in all, per Projector (and never more than 256 MiB / 1 GiB); rows not kept are generated in
# blocks of at most _GEN_SHARE of the budget.  skattr.gradients counts these against the budget.
_CACHE_SHARE, _CACHE_TOTAL_SHARE, _GEN_SHARE = 1 / 8, 1 / 8, 1 / 32
_CACHE_BYTES = 256 * 2**20
_CACHE_TOTAL = 1024 * 2**20
_K_CHUNK = 256  # factored rows per fused chunk (a speed setting, not part of the definition)


def _block_seed(seed: int, key: str, block: int) -> int:
    return (zlib.crc32(f"{int(seed)}|{key}|{int(block)}".encode()) * 2654435761 + block) % (2**63 - 1)


def _generator(seed, key, block):
    g = torch.Generator(device="cpu")
    g.manual_seed(_block_seed(seed, key, block))
    return g


def _dense_rows(kind, seed, key, r0, r1, p, dtype):
    """Rows ``r0:r1`` of the dense ``kind`` projection for a block of ``p`` coordinates."""
    out = []
    b0, b1 = r0 // ROW_BLOCK, (r1 - 1) // ROW_BLOCK
    for b in range(b0, b1 + 1):
        g = _generator(seed, key, b)
        if kind == "rademacher":
            blk = torch.randint(0, 2, (ROW_BLOCK, p), generator=g, dtype=torch.int8)
            blk = blk.to(dtype).mul_(2).sub_(1)
        else:
            blk = torch.randn(ROW_BLOCK, p, generator=g, dtype=torch.float32).to(dtype)
        lo = max(r0 - b * ROW_BLOCK, 0)
        hi = min(r1 - b * ROW_BLOCK, ROW_BLOCK)
        out.append(blk[lo:hi])
    return torch.cat(out) if len(out) > 1 else out[0]


def _sparse_rows(seed, key, r0, r1, p):
    """Indices, values of rows r0:r1 of a very sparse projection (nested: row blocks are seeded)."""
    s = max(1, math.ceil(math.sqrt(p)))
    cols, vals = [], []
    scale = math.sqrt(p / s)
    b0 = r0 // ROW_BLOCK
    for b in range(b0, (r1 - 1) // ROW_BLOCK + 1):
        g = _generator(seed, key + "|sparse", b)
        cols.append(torch.randint(0, p, (ROW_BLOCK, s), generator=g))
        vals.append(torch.randint(0, 2, (ROW_BLOCK, s), generator=g).float().mul_(2).sub_(1))
    lo = r0 - b0 * ROW_BLOCK
    cols = torch.cat(cols)[lo : lo + r1 - r0]
    vals = torch.cat(vals)[lo : lo + r1 - r0] * scale
    return cols, vals


class Projector:
    """A seeded, nested random projection for the parameter groups of one model.

    Parameters
    ----------
    kind : {"rademacher", "gaussian", "sparse", "factored"}
    k : int
        Number of rows.
    start : int, default=0
        Index of the first row: rows ``start:start + k`` of the nested projection (used to extend
        features computed at a smaller size).
    seed : int
    device, dtype : torch device and dtype of the features.
    """

    def __init__(self, kind, k, seed, *, start=0, device="cpu", dtype=torch.float32):
        if kind not in KINDS:
            raise ValueError(f"projection must be one of {KINDS}, got {kind!r}.")
        if int(k) < 1:
            raise ValueError(f"projection_dim must be a positive integer, got {k}.")
        self.kind, self.k, self.seed, self.start = kind, int(k), int(seed), int(start)
        self.device, self.dtype = torch.device(device), dtype
        self._cache = {}
        self._cached_bytes = 0

    @property
    def _dense_kind(self):
        """The kind of rows used on materialised gradients (Gaussian for the structured kinds)."""
        return "gaussian" if self.kind in STRUCTURED else self.kind

    # -- dense / sparse rows on a materialised gradient block ---------------------------
    def project_dense(self, key: str, g: torch.Tensor, out: torch.Tensor) -> None:
        """``out += g @ P_key^T`` for ``g`` of shape (..., p); ``out`` of shape (..., k)."""
        p = g.shape[-1]
        kind = self._dense_kind
        g2 = g.reshape(-1, p)
        o2 = out.view(-1, self.k)
        if kind == "sparse":
            ck = (key, "sparse")
            if ck not in self._cache:
                cols, vals = _sparse_rows(self.seed, key, self.start, self.start + self.k, p)
                s = cols.shape[1]
                crow = torch.arange(0, self.k * s + 1, s)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    P = torch.sparse_csr_tensor(
                        crow, cols.flatten().clone(), vals.flatten().to(self.dtype), size=(self.k, p)
                    )
                self._cache[ck] = P.to(self.device)
            o2 += torch.sparse.mm(self._cache[ck], g2.T.contiguous()).T
            return
        ck = (key, kind)
        if ck not in self._cache and self._caches_dense(key, p):
            P = _dense_rows(kind, self.seed, key, self.start, self.start + self.k, p, self.dtype)
            self._cache[ck] = P.to(self.device)
            self._cached_bytes += P.numel() * P.element_size()
        if ck in self._cache:
            o2 += g2 @ self._cache[ck].T
            return
        rows = self._gen_rows(p)
        for r0 in range(0, self.k, rows):
            r1 = min(self.k, r0 + rows)
            s0 = self.start
            P = _dense_rows(kind, self.seed, key, s0 + r0, s0 + r1, p, self.dtype).to(self.device)
            o2[:, r0:r1] += g2 @ P.T

    def _caps(self):
        """(bytes kept per group, kept in all, generated at once) under the memory budget."""
        b = _memory.memory_budget()
        return (min(_CACHE_BYTES, int(b * _CACHE_SHARE)),
                min(_CACHE_TOTAL, int(b * _CACHE_TOTAL_SHARE)), int(b * _GEN_SHARE))

    def _gen_rows(self, p):
        """Rows generated at once for a group of ``p`` coordinates whose rows are not kept."""
        return max(ROW_BLOCK, (self._caps()[2] // max(1, p * 4)) // ROW_BLOCK * ROW_BLOCK)

    def _caches_dense(self, key: str, p: int) -> bool:
        """Whether the dense rows of group ``key`` (``p`` coordinates) are, or would be, kept in
        memory (a decision that never changes once they are)."""
        if (key, self._dense_kind) in self._cache:
            return True
        nbytes = self.k * p * torch.finfo(self.dtype).bits // 8
        per_group, total, _ = self._caps()
        return nbytes <= per_group and self._cached_bytes + nbytes <= total

    def planned_bytes(self, groups):
        """Bytes this projector will newly hold while projecting the parameter groups
        ``groups``, ``[(key, d_out, d_in, factored)]`` (``factored``: projected from an
        (input, output-gradient) pair under a structured kind): row factors and kept dense rows
        not drawn yet, plus the largest block generated at once (float32 rows and their copy).
        The memory planner of :func:`skattr.gradients.compute_records` counts it."""
        isz = torch.finfo(self.dtype).bits // 8
        new, transient, cached = 0, 0, self._cached_bytes
        per_group, total, _ = self._caps()
        for key, d_out, d_in, factored in groups:
            if factored and self.kind in STRUCTURED:
                if (key, self.kind) not in self._cache:
                    r0, r1 = self._factor_range()
                    new += (r1 - r0) * (d_out + d_in) * isz
                    transient = max(transient, (r1 - r0) * max(d_out, d_in) * (4 + isz))
                continue
            p = d_out * d_in
            if self._dense_kind == "sparse":
                if (key, "sparse") not in self._cache:
                    new += self.k * math.ceil(math.sqrt(p)) * (8 + isz) + (self.k + 1) * 8
                continue
            if (key, self._dense_kind) in self._cache:
                continue
            nbytes = self.k * p * isz
            if nbytes <= per_group and cached + nbytes <= total:  # as _caches_dense decides
                cached += nbytes
                new += nbytes
                transient = max(transient, self.k * p * isz + ROW_BLOCK * p * 4)
            else:
                transient = max(transient, min(self.k, self._gen_rows(p)) * p * (4 + 2 * isz))
        return int(new + transient)

    # -- factored rows on an (input, output-gradient) pair ------------------------------
    def factors(self, key: str, d_out: int, d_in: int):
        """``(U, V)``: row factors (``"factored"``: one u and one v per row) or, for
        ``"kronecker"``, the u and v vectors of the row blocks covering this projector's rows."""
        ck = (key, self.kind)
        if ck not in self._cache:
            r0, r1 = self._factor_range()
            tag = "|u" if self.kind == "factored" else "|ku"
            U = _dense_rows("gaussian", self.seed, key + tag, r0, r1, d_out, self.dtype)
            V = _dense_rows("gaussian", self.seed, key + tag.replace("u", "v"), r0, r1, d_in, self.dtype)
            if self.kind == "kronecker":
                # vector (b, j) of a super-block is stored at (j, b): products with them come
                # out in the rows' order (block index fastest) without a transposing copy
                order = torch.arange(r1 - r0).view(-1, _KRON_BLOCKS, KRON_SIDE).transpose(1, 2).flatten()
                U, V = U[order], V[order]
            self._cache[ck] = (U.to(self.device), V.to(self.device))
        return self._cache[ck]

    def _factor_range(self):
        r0, r1 = self.start, self.start + self.k
        if self.kind == "factored":
            return r0, r1
        return r0 // _KRON_SUPER * _KRON_VECS, -(-r1 // _KRON_SUPER) * _KRON_VECS

    def project_factored(self, key, a, d, out):
        """``out += sum_s (U d_s) * (V a_s)``; ``a`` (n, L, d_in), ``d`` (n, L, m, d_out).

        Rows are processed in chunks of ``_K_CHUNK`` so that the two factor products of a chunk
        stay in cache and are multiplied into ``out`` in one fused pass.
        """
        if self.kind == "kronecker":
            return self._project_kronecker(key, a, d, out)
        U, V = self.factors(key, d.shape[-1], a.shape[-1])
        L = a.shape[1]
        for j0 in range(0, self.k, _K_CHUNK):
            j1 = min(self.k, j0 + _K_CHUNK)
            o = out[..., j0:j1]
            if L == 1:
                av = a[:, 0] @ V[j0:j1].T  # (n, c)
                du = d[:, 0] @ U[j0:j1].T  # (n, m, c)
                o.addcmul_(du, av[:, None, :])
            else:
                av = a @ V[j0:j1].T  # (n, L, c)
                du = d @ U[j0:j1].T  # (n, L, m, c)
                o += torch.einsum("nlmk,nlk->nmk", du, av)

    def _project_kronecker(self, key, a, d, out):
        """Rows come in super-blocks of ``_KRON_SUPER = 256``: 16 blocks ``b``, each with
        ``s = KRON_SIDE`` u and v vectors; row ``(i * s + j) * 16 + b`` of a super-block is
        ``u_{b,i} (x) v_{b,j}``, whose feature is ``sum_s (u_{b,i} . delta_s)(v_{b,j} . a_s)``.
        A block of ``s^2`` rows costs ``s`` u- and ``s`` v-products instead of ``s^2`` each, and
        the block index runs fastest so the products are formed along contiguous memory."""
        s, nbs = KRON_SIDE, _KRON_BLOCKS
        U, V = self.factors(key, d.shape[-1], a.shape[-1])  # vectors stored (super, j, b)
        n, L, m = a.shape[0], a.shape[1], d.shape[2]
        nsb = U.shape[0] // _KRON_VECS
        if L == 1 and self.start % _KRON_SUPER == 0 and self.k == nsb * _KRON_SUPER and out.is_contiguous():
            # whole super-blocks (the usual case): two products and one fused update per layer
            av = (a[:, 0] @ V.T).view(n, 1, nsb, 1, s, nbs)
            du = (d[:, 0] @ U.T).view(n, m, nsb, s, 1, nbs)
            out.view(n, m, nsb, s, s, nbs).addcmul_(du, av)
            return
        for v0, v1, g0, lo, hi in self._kron_super_blocks(U.shape[0]):
            av = (a @ V[v0:v1].T).view(n, L, s, nbs)  # (n, L, j, b)
            du = (d @ U[v0:v1].T).view(n, L, m, s, nbs)  # (n, L, m, i, b)
            if L == 1:
                blk = du[:, 0, :, :, None, :] * av[:, 0, None, None, :, :]
            else:
                blk = torch.einsum("nlmib,nljb->nmijb", du, av)
            blk = blk.reshape(n, m, _KRON_SUPER)
            out[..., lo:hi] += blk[..., lo - g0 : hi - g0]

    def project_kronecker_dense(self, key, g, out):
        """``"kronecker"`` rows applied to formed gradients ``g`` (n, m, d_out, d_in): the feature
        of row ``u (x) v`` is ``u^T g v``, so a block costs ``d_out d_in`` per v vector (``p k / 4``
        in all) instead of ``p`` per row.  The same rows as :meth:`project_factored` (for layers
        whose gradient is cheaper to form than to project factor by factor)."""
        U, V = self.factors(key, g.shape[-2], g.shape[-1])
        n, m = g.shape[:2]
        for v0, v1, g0, lo, hi in self._kron_super_blocks(U.shape[0]):
            W = (g @ V[v0:v1].T).view(n, m, g.shape[-2], KRON_SIDE, _KRON_BLOCKS)  # (n,m,o,j,b)
            Ub = U[v0:v1].view(KRON_SIDE, _KRON_BLOCKS, -1)  # (i, b, d_out)
            blk = torch.einsum("ibo,nmojb->nmijb", Ub, W).reshape(n, m, _KRON_SUPER)
            out[..., lo:hi] += blk[..., lo - g0 : hi - g0]

    def _kron_super_blocks(self, n_vectors):
        """``(v0, v1, g0, lo, hi)`` per kronecker super-block: its vectors ``v0:v1`` in the
        factors, its first row ``g0`` in this projector's numbering (negative when it starts
        before ``start``), and the rows ``lo:hi`` of the output it covers."""
        first = self.start // _KRON_SUPER * _KRON_SUPER  # first row covered by the factors
        for v0 in range(0, n_vectors, _KRON_VECS):
            g0 = first + v0 // _KRON_VECS * _KRON_SUPER - self.start
            yield v0, v0 + _KRON_VECS, g0, max(g0, 0), min(g0 + _KRON_SUPER, self.k)

    def project_formed(self, key, g, out):
        """``out += P_key g`` for formed Linear / Conv weight gradients ``g`` (n, m, d_out, d_in):
        the kronecker rows for ``"kronecker"`` (the same rows as :meth:`project_factored`), the
        dense rows of :meth:`project_dense` otherwise."""
        if self.kind == "kronecker":
            self.project_kronecker_dense(key, g, out)
        else:
            self.project_dense(key, g.flatten(2), out)


def scale_features(F: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` features of unscaled features ``F`` (..., k_max), divided by sqrt(k)."""
    if k > F.shape[-1]:
        raise ValueError(f"Requested {k} projected features but only {F.shape[-1]} were computed.")
    return F[..., :k] / math.sqrt(k)
