"""Preconditioners: the ``M`` of an attribution score ``phi(x)^T M phi_i``, behind one interface.

Like traker's score computers (``get_xtx`` / ``get_x_xtx_inv`` / ``get_scores``), the solver is
its own object.  A preconditioner is fitted on one model's training features (a
:class:`skattr.store.FeatureStore` or :class:`skattr.store.MemoryStore`, model index ``m``), then

* ``scores(G, features, m, S, first)`` writes (``first``) or adds ``G M Phi^T`` into the
  float64 score matrix ``S`` (t, n), for target features ``G`` (t, k);
* ``apply(G)`` returns ``G M`` (t, k);
* ``self_scores(features, m)`` returns ``diag(Phi M Phi^T)`` (n,), the self-influence.

Implementations here act on (projected) features:

* :class:`RidgeGaussNewton` -- TRAK's ``M = (Phi^T Phi + lambda I)^{-1}``, the Gauss-Newton
  approximation of the inverse Hessian of a linearised model, with a relative ridge;
* :class:`Identity` -- ``M = I``: TracIn and Grad-Dot.

The inverse Hessian of the training loss (influence functions) acts on parameter-space gradients
before they are projected: see :mod:`skattr.hessian`.
"""

from __future__ import annotations

import numpy as np
import torch

from ._linalg import upper_gram
from ._validation import check_memory

__all__ = ["Preconditioner", "RidgeGaussNewton", "Identity"]

_SCORE_CHUNK = 1024  # training examples per scoring product
_F32_MAX_COND = 1e5  # largest condition-number bound factorised in float32 (error ~ cond * 6e-8)


def _solve_right(B, L):
    """``B (L L^T)^-1`` for a lower Cholesky factor ``L``: two triangular solves from the right,
    in B's (rows, dim) layout."""
    B = torch.linalg.solve_triangular(L.T, B, upper=True, left=False)
    return torch.linalg.solve_triangular(L, B, upper=False, left=False)


def _accumulate(dst, src, first):
    """``dst = src`` (first model) or ``dst += src``, converting to dst's dtype on the fly."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


def as_tensor(F, device, dtype=torch.float64):
    """A feature block as a tensor on ``device`` (memory maps are read into memory once)."""
    if isinstance(F, np.memmap) or not F.flags.writeable:
        F = np.array(F)
    return torch.from_numpy(F).to(device=device, dtype=dtype)


class Preconditioner:
    """Base class: ``M = I`` scoring loops that subclasses specialise through :meth:`apply`."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def product_dtype(self, features):
        """Precision of the feature products: the features' own."""
        return torch.float64 if features.dtype == "float64" else torch.float32

    def fit(self, features, m):
        self.n_, self.k_ = int(features.n_rows), int(features.dim)
        return self

    def apply(self, G, features=None, m=0):
        """``G M`` for target features ``G`` (t, k) (``features``: model ``m``'s training
        features, for solvers that need them)."""
        return G

    def scores(self, G, features, m, S, first=True):
        """Write (``first``) or add ``G M Phi_m^T`` into ``S`` (t, n) (float64)."""
        wide = self.product_dtype(features)
        T = self.apply(G).to(wide)
        t, n = S.shape
        # products land in one reused buffer of column chunks and are accumulated into S
        # (float64): no zero-filled or converted (t, n) temporaries
        chunk = min(n, _SCORE_CHUNK)
        buf = torch.empty(t * chunk, dtype=wide, device=S.device)
        for r0, r1, F, _ in features.iter_blocks(m):
            Fb = as_tensor(F, self.device, wide)
            for c0 in range(r0, r1, chunk):
                c1 = min(r1, c0 + chunk)
                out = buf[: t * (c1 - c0)].view(t, c1 - c0)
                torch.mm(T, Fb[c0 - r0 : c1 - r0].T, out=out)
                _accumulate(S[:, c0:c1], out, first)
        return S

    def self_scores(self, features, m):
        """``diag(Phi M Phi^T)`` (n,), float64."""
        out = torch.zeros(features.n_rows, dtype=torch.float64, device=self.device)
        for r0, r1, F, _ in features.iter_blocks(m):
            Fb = as_tensor(F, self.device)
            out[r0:r1] = (self.apply(Fb) * Fb).sum(1)
        return out


class Identity(Preconditioner):
    """``M = I``: plain inner products of features (TracIn, Grad-Dot)."""


class RidgeGaussNewton(Preconditioner):
    """TRAK's ``M = (Phi^T Phi + lambda I)^{-1}`` with ``lambda = ridge * mean_i |phi_i|^2``.

    The smaller of ``Phi^T Phi`` (``k x k``, "primal") and ``Phi Phi^T`` (``n x n``, "dual") is
    factorised; both give the same scores (push-through identity), and the dual form is the
    minimum-norm solution when ``ridge=0`` and ``k > n``.  Products of float32 features run in
    float32 and are summed across store blocks in float64; the system is factorised in float32
    too when it is well conditioned (``1 + n / ridge <= 1e5``; a breakdown is redone in float64).
    ``ridge=0`` or float64 features: float64 throughout.

    Parameters
    ----------
    ridge : float >= 0
        Relative ridge.
    device : torch device
    persist : bool, default=False
        Save the system matrix in the feature store (``features.save_array``) and reuse it.
    n_jobs : int or None, default=None
        joblib workers for ``Phi^T Phi`` over the blocks of an on-disk store (the same sum
        whatever ``n_jobs``: :func:`skattr.parallel.block_gram`).

    Attributes
    ----------
    cholesky_ : ndarray
        Lower Cholesky factor of the system, in the precision it was factorised in.
    lambda_ : float
        The absolute ridge.
    solver_ : {"primal", "dual"}
    """

    def __init__(self, ridge=1.0, device="cpu", persist=False, n_jobs=None):
        super().__init__(device)
        self.ridge = float(ridge)
        self.persist = persist
        self.n_jobs = n_jobs

    @classmethod
    def from_factor(cls, cholesky, lam, solver, ridge, n, k, device="cpu"):
        """A fitted preconditioner from a stored factor (old TRAK pickles)."""
        p = cls(ridge, device)
        p.cholesky_, p.lambda_, p.solver_, p.n_, p.k_ = cholesky, float(lam), solver, int(n), int(k)
        return p

    def product_dtype(self, features):
        # products of features in their own precision (float64 for ridge=0, where the rank
        # decides), accumulated and solved in float64
        if features.dtype == "float64" or self.ridge == 0.0:
            return torch.float64
        return torch.float32

    def get_xtx(self, features, m):
        """Model ``m``'s system matrix ``Phi^T Phi`` (primal) or ``Phi Phi^T`` (dual).

        Only its lower triangle is filled (all the Cholesky factorisation reads): the matrix is
        the transpose of row panels of the upper triangle, so no half is mirrored.  It is in the
        products' precision when the features are one block (in memory), in float64 when
        blocks are summed.
        """
        st, n, k = features, self.n_, self.k_
        name = f"m{m:03d}_gram_{self.solver_}_upper"
        shape = (k, k) if self.solver_ == "primal" else (n, n)
        U = st.load_array(name, mmap=False) if self.persist else None  # its upper triangle
        if U is not None and U.shape == shape:
            return torch.from_numpy(np.array(U)).to(self.device).T
        wide = self.product_dtype(features)
        blocks = list(st.iter_blocks(m))
        acc = wide if len(blocks) == 1 else torch.float64
        if self.solver_ == "primal":  # sum_b Phi_b^T Phi_b, one block per joblib job
            from .parallel import block_gram

            U = block_gram(st, m, wide, acc, self.device, getattr(self, "n_jobs", None))
        else:
            check_memory(n * n * torch.finfo(acc).bits // 8, f"The {n} x {n} dual Gram matrix")
            U = torch.empty(n, n, dtype=acc, device=self.device)
            for i, (r0, r1, F, _) in enumerate(blocks):
                Fa = as_tensor(F, self.device, wide)
                U[r0:r1, r0:r1] = upper_gram(Fa, acc)
                for s0, s1, F2, _ in blocks[i + 1 :]:
                    U[r0:r1, s0:s1] = Fa @ as_tensor(F2, self.device, wide).T
        if self.persist:  # persisted without the unspecified triangle
            st.save_array(name, U.triu_().cpu().numpy())
        return U.T

    def fit(self, features, m):
        super().fit(features, m)
        n, k = self.n_, self.k_
        self.solver_ = "primal" if k <= n else "dual"
        wide = self.product_dtype(features)
        G = self.get_xtx(features, m)
        mean_sq = float(torch.diagonal(G).sum(dtype=torch.float64)) / n
        if not np.isfinite(mean_sq):
            raise FloatingPointError(f"Model {m}: the features contain NaN or infinity.")
        lam = self.ridge * mean_sq
        G.diagonal().add_(lam)
        # float32 factorisation only where the system is well conditioned: its condition
        # number is at most 1 + trace / lambda = 1 + n / ridge
        fast = wide == torch.float32 and 1.0 + n / max(self.ridge, 1e-300) <= _F32_MAX_COND
        L = self._cholesky(G, m, lam, torch.float32 if fast else torch.float64)
        self.cholesky_ = L.cpu().numpy()
        self.lambda_ = lam
        return self

    def _cholesky(self, A, m, lam, dtype=torch.float64):
        """Lower Cholesky factor of the system ``A`` (its lower triangle is read), with clear
        errors when singular.

        ``dtype=float32`` (float32 features, ridge > 0, condition number at most
        ``_F32_MAX_COND``) factorises in float32: ``A`` holds sums of float32 products, so it
        is only accurate to float32 rounding, and a float32 factorisation's backward error is of
        that same order (twice as fast); a float32 factorisation that breaks down is redone in
        float64 (and kept in float64).
        """
        if dtype != torch.float64 and lam > 0:
            L, info = torch.linalg.cholesky_ex(A.to(dtype))
            if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
                return L
        A = A.to(torch.float64)
        dim = A.shape[0]
        what = "Phi^T Phi (k x k)" if self.solver_ == "primal" else "Phi Phi^T (n x n)"
        hint = "set ridge > 0 (e.g. the default ridge=1.0)" + (
            ", or use a projection_dim below n_train" if self.solver_ == "primal" else ""
        )
        scale = float(torch.diagonal(A).abs().max()) if dim else 0.0
        if scale == 0.0:
            raise ValueError(
                f"Model {m}: every feature is zero (the output does not depend on the "
                "selected parameters); nothing to attribute."
            )
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise ValueError(
                f"Model {m}: the feature matrix {what} is singular (ridge={self.ridge}); {hint}."
            )
        piv = torch.diagonal(L) ** 2
        tol = dim * np.finfo(np.float64).eps * 10
        if lam == 0.0 and float(piv.min()) <= tol * scale:
            rank = int((piv > tol * scale).sum())
            raise ValueError(
                f"Model {m}: with ridge=0 the feature matrix {what} is singular (numerical rank "
                f"about {rank} of {dim}); {hint}."
            )
        return L

    def _factor(self):
        return torch.from_numpy(self.cholesky_).to(self.device)

    def apply(self, G, features=None, m=0):
        """``G (Phi^T Phi + lambda I)^{-1}``.

        The dual solver uses the push-through identity ``(Phi^T Phi + lambda I)^{-1} =
        (I - Phi^T (Phi Phi^T + lambda I)^{-1} Phi) / lambda`` and needs the training
        ``features`` of model ``m`` and ``lambda > 0``.
        """
        L = self._factor()
        if self.solver_ == "primal":
            return _solve_right(G.to(L.dtype), L)
        if features is None or self.lambda_ == 0.0:
            raise ValueError(
                "Preconditioning target features with the dual (n x n) system needs the training "
                "features and ridge > 0."
            )
        wide = self.product_dtype(features)
        G = G.to(torch.float64)
        B = torch.empty(G.shape[0], self.n_, dtype=wide, device=G.device)
        for r0, r1, F, _ in features.iter_blocks(m):
            B[:, r0:r1] = G.to(wide) @ as_tensor(F, self.device, wide).T
        C = _solve_right(B.to(L.dtype), L).to(torch.float64)  # G Phi^T (Phi Phi^T + l I)^-1
        out = G.clone()
        for r0, r1, F, _ in features.iter_blocks(m):
            out -= C[:, r0:r1] @ as_tensor(F, self.device, torch.float64)
        return out / self.lambda_

    def get_x_xtx_inv(self, G, features=None, m=0):
        """traker's name for :meth:`apply`."""
        return self.apply(G, features, m)

    def scores(self, G, features, m, S, first=True):
        if self.solver_ == "primal":
            return super().scores(G, features, m, S, first)
        wide = self.product_dtype(features)
        L = self._factor()
        t, n = S.shape
        B = torch.empty(t, n, dtype=wide, device=S.device)
        for r0, r1, F, _ in features.iter_blocks(m):
            B[:, r0:r1] = G.to(wide) @ as_tensor(F, self.device, wide).T
        _accumulate(S, _solve_right(B.to(L.dtype), L), first)
        return S

    get_scores = scores

    def self_scores(self, features, m):
        n, dev = self.n_, self.device
        out = torch.zeros(n, dtype=torch.float64, device=dev)
        if self.solver_ == "primal":
            # phi_i^T (L L^T)^-1 phi_i = |L^-1 phi_i|^2
            L = self._factor()
            for r0, r1, F, _ in features.iter_blocks(m):
                W = torch.linalg.solve_triangular(L.T, as_tensor(F, dev, L.dtype), upper=True, left=False)
                out[r0:r1] += (W * W).sum(1, dtype=torch.float64)
        else:
            # phi_i^T (Phi^T Phi + l I)^-1 phi_i = 1 - l [(Phi Phi^T + l I)^-1]_ii
            L = self._factor().to(torch.float64)
            Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=dev), upper=False)
            out += 1.0 - self.lambda_ * (Linv**2).sum(0)
        return out
