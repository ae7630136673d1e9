"""Parameter-space curvature of the training loss, for influence functions.

Everything here acts on *flat parameter vectors* of the parameters a model's gradient records
cover (``model.prefixes_``), in the order of :func:`skattr.gradients.flatten` (the records'
order; weight before bias within a record), described by a :class:`ParamSpace`.

* :class:`TrainingLoss` -- the mean training loss ``L(theta) = (1/n) sum_i l(z_i; theta)`` over a
  fitted set as a function of that vector; Hessian-vector products (HVPs) of it, batched over
  vectors with ``torch.func`` (forward-over-reverse; a reverse-over-reverse autograd loop where
  forward-mode AD is not available), over the whole set or a minibatch; the exact Hessian
  assembled from HVPs of unit vectors; its largest eigenvalue by power iteration.
* Solvers of ``(H + lambda I) x = g`` for many ``g`` at once, one interface (``solve(G, loss)``
  and ``quad(G, loss) = diag(G (H + lambda I)^-1 G^T)``):

  - :class:`ExactInverse` -- the eigendecomposition of the exact Hessian (small models);
  - :class:`ConjugateGradient` -- CG with HVPs of the mean training loss;
  - :class:`LiSSA` -- the scaled Neumann series of Agarwal et al. (2017) as used by Koh and
    Liang (2017), with HVPs on the whole set (deterministic) or on seeded minibatches;
  - :class:`EKFAC` -- eigenvalue-corrected Kronecker factors (George et al., 2018; Grosse et
    al., 2023) of the Gauss-Newton matrix (or of the empirical Fisher) from the structured
    gradient engine's per-layer (input, output-gradient) records.

* :func:`project_like` -- project parameter-space vectors with the very linear map the
  featuriser applies to the gradient records (so preconditioned targets and raw training
  features live in one projected space).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from sklearn.exceptions import ConvergenceWarning
from torch.func import functional_call, grad, jvp, vmap

from . import gradients as _grad
from ._validation import check_memory
from .outputs import ModelOutput
from .projection import STRUCTURED

__all__ = [
    "ParamSpace",
    "TrainingLoss",
    "ExactInverse",
    "ConjugateGradient",
    "LiSSA",
    "EKFAC",
    "GGNOutput",
    "record_chunks",
    "project_like",
    "top_eigenvalue",
]

_TANGENTS = 2**16  # (examples x vectors) per vmapped HVP call
_DENSE_BLOCK_MAX = 4096  # EK-FAC: explicit blocks for non-Kronecker groups up to this size


# ==========================================================================================
# the flat parameter space of the gradient records
# ==========================================================================================
@dataclass
class _Block:
    key: str
    names: tuple
    start: int
    stop: int
    kron: bool
    d_out: int = 0
    d_in: int = 0  # a Kronecker block's input width, the bias column included
    bias: bool = False


def _record_names(key):
    """Parameter names a record covers: ``"fc.weight+bias"`` -> ``fc.weight``, ``fc.bias`` (the
    structured engine keys a root module's record ``".weight+bias"``)."""
    if key.endswith("+bias"):
        w = key[: -len("+bias")]
        names = (w, w[: -len("weight")] + "bias")
    else:
        names = (key,)
    return tuple(n[1:] if n.startswith(".") else n for n in names)


def record_chunks(records):
    """``(i0, i1, records)`` over a batch's records (a :class:`~skattr.gradients.DeferredRecords`
    chunk by chunk)."""
    if isinstance(records, _grad.DeferredRecords):
        yield from records.chunks()
    else:
        yield 0, _grad.records_shape(records)[0], records


class ParamSpace:
    """The flat vector of the parameters covered by a network's gradient records.

    Built from the records of one batch (any output): one block per record, in the records'
    order, each block the record's parameters flattened row-major (weight, then bias), as
    :func:`skattr.gradients.flatten` lays them out.  Kronecker blocks (Linear / Conv records)
    also convert to and from their ``(d_out, d_in)`` matrix layout (the bias as last column).
    """

    def __init__(self, net, records):
        params = dict(net.named_parameters())
        self.blocks, self.names, self.shapes = [], [], []
        off = 0
        for r in records:
            names = _record_names(r.key)
            missing = [n for n in names if n not in params]
            size = sum(params[n].numel() for n in names if n in params)
            if missing or size != r.n_params:
                raise ValueError(
                    f"The gradient record {r.key!r} does not match the network's parameters "
                    f"({missing[0] if missing else f'{r.n_params} entries, parameters hold {size}'}"
                    "); influence functions need records keyed by parameter names."
                )
            kron = isinstance(r, _grad.KronRecord)
            self.blocks.append(_Block(
                r.key, names, off, off + size, kron,
                d_out=int(r.d.shape[-1]) if kron else 0, d_in=int(r.d_in) if kron else 0,
                bias=bool(r.bias) if kron else False,
            ))
            for n in names:
                self.names.append(n)
                self.shapes.append(tuple(params[n].shape))
            off += size
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"A parameter appears in two gradient records: {self.names}.")
        self.dim = off

    def check(self, records):
        """Raise unless ``records`` have this space's keys and kinds."""
        keys = [(r.key, isinstance(r, _grad.KronRecord)) for r in records]
        if keys != [(b.key, b.kron) for b in self.blocks]:
            raise RuntimeError(
                f"Gradient records changed layout between batches or outputs: {keys} vs "
                f"{[(b.key, b.kron) for b in self.blocks]}."
            )

    def split(self, theta):
        """``{name: view}`` of a flat vector ``theta`` (D,)."""
        out, off = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out[n] = theta[off : off + k].view(s)
            off += k
        return out

    def flat_params(self, net):
        params = dict(net.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    @staticmethod
    def to_kron(blk, V):
        """A Kronecker block of ``V`` (..., D) as matrices (..., d_out, d_in)."""
        v = V[..., blk.start : blk.stop]
        lead = v.shape[:-1]
        if blk.bias:
            nw = blk.d_out * (blk.d_in - 1)
            W = v[..., :nw].reshape(*lead, blk.d_out, blk.d_in - 1)
            return torch.cat([W, v[..., nw:, None]], dim=-1)
        return v.reshape(*lead, blk.d_out, blk.d_in)

    @staticmethod
    def from_kron(blk, G):
        """Inverse of :meth:`to_kron`: (..., d_out, d_in) -> (..., block size)."""
        if blk.bias:
            return torch.cat([G[..., :-1].flatten(-2), G[..., -1]], dim=-1)
        return G.flatten(-2)


def project_like(projector, records, space, Y, out):
    """``out += P Y`` (unscaled), with ``P`` the linear map the featuriser applies to ``records``.

    ``Y`` (b, D) are parameter-space vectors (e.g. preconditioned gradients) of the batch whose
    gradient records are ``records``.  :func:`skattr.gradients.project` chooses, per record, the
    rows it projects with (Kronecker-structured rows ``u (x) v`` from a Linear / Conv record's
    factors under ``"factored"`` / ``"kronecker"``, the dense rows of the group's key
    otherwise); a vector that is not a rank-one gradient is projected here with the *same* rows:
    ``u^T G v`` for a structured row, ``g . p`` for a dense one.  So ``project_like(P, recs,
    space, flatten(recs))`` equals ``project(recs, P)`` (tested for every projection kind).
    """
    o3 = out[:, None, :]
    for r, blk in zip(records, space.blocks):
        if blk.kron:
            G = space.to_kron(blk, Y)  # (b, d_out, d_in)
            if projector.kind in STRUCTURED:
                # the choice gradients.project makes for this record (from its shape alone)
                if _grad._dense_cheaper(r):
                    projector.project_formed(r.key, G[:, None], o3)
                elif projector.kind == "kronecker":
                    projector.project_kronecker_dense(r.key, G[:, None], o3)
                else:  # "factored": row j is u_j (x) v_j, its feature u_j^T G v_j
                    U, V = projector.factors(r.key, blk.d_out, blk.d_in)
                    out += ((G @ V.T) * U.T).sum(1)
            else:  # dense rows on the record's formed layout (weight rows, bias column last)
                projector.project_dense(r.key, G.flatten(1)[:, None], o3)
        else:
            projector.project_dense(r.key, Y[:, None, blk.start : blk.stop], o3)
    return out


# ==========================================================================================
# the mean training loss and its HVPs
# ==========================================================================================
class TrainingLoss:
    """``L(theta) = (1/n) sum_i output(net(x_i; theta), y_i)`` over a training set.

    Parameters
    ----------
    net : nn.Module
        The network (eval mode); its current parameters are the point ``theta`` of every HVP.
    output : ModelOutput
        The per-example loss (:class:`~skattr.outputs.LossOutput`).
    space : ParamSpace
    X, y : tensors
        Inputs and encoded targets of the training set.
    batch_size : int
        Examples per forward pass.
    """

    def __init__(self, net, output, space, X, y, batch_size):
        self.net, self.output, self.space = net, output, space
        self.X, self.y, self.n = X, y, int(X.shape[0])
        self.batch_size = int(batch_size)
        self.theta = space.flat_params(net)
        chosen = set(space.names)
        self.rest = {n: p.detach() for n, p in net.named_parameters() if n not in chosen}
        self.rest.update(dict(net.named_buffers()))
        self.forward_mode = True  # forward-over-reverse HVPs until an operation refuses

    def _loss_sum(self, theta, xb, yb):
        z = functional_call(self.net, (self.space.split(theta), self.rest), (xb,))
        if z.ndim == 1:
            z = z[:, None]
        return self.output(z, yb).sum()

    def value(self):
        """The mean training loss (float)."""
        with torch.no_grad():
            tot = sum(float(self._loss_sum(self.theta, self.X[i : i + self.batch_size],
                                           self.y[i : i + self.batch_size]))
                      for i in range(0, self.n, self.batch_size))
        return tot / self.n

    def _batch_hvp(self, xb, yb, V):
        """``sum_{i in batch} H_i V^T`` rows (c, D)."""
        theta = self.theta
        if self.forward_mode:
            g = grad(lambda t: self._loss_sum(t, xb, yb))
            chunk = max(1, _TANGENTS // max(1, xb.shape[0]))
            try:
                return vmap(lambda v: jvp(g, (theta,), (v,))[1], chunk_size=chunk)(V)
            except (RuntimeError, NotImplementedError):
                self.forward_mode = False  # e.g. an operation without a forward-mode formula
        t = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            gt = torch.autograd.grad(self._loss_sum(t, xb, yb), t, create_graph=True)[0]
            rows = [torch.autograd.grad(gt, t, v, retain_graph=i < len(V) - 1)[0]
                    for i, v in enumerate(V)]
        return torch.stack(rows)

    def hvp(self, V, idx=None):
        """``(H V^T)^T`` (c, D) for vectors ``V`` (c, D): ``H`` the Hessian of the mean loss over
        the whole set, or over the examples ``idx`` (a minibatch) when given."""
        V = V.to(self.theta.dtype)
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        m = X.shape[0]
        out = torch.zeros_like(V)
        for i in range(0, m, self.batch_size):
            out += self._batch_hvp(X[i : i + self.batch_size], y[i : i + self.batch_size], V)
        return out / m

    def hessian(self, chunk=None):
        """The exact Hessian (D, D), float64, from HVPs of unit vectors (symmetrised)."""
        D = self.space.dim
        chunk = int(chunk or max(1, min(D, _TANGENTS // max(1, min(self.n, self.batch_size)))))
        H = torch.empty(D, D, dtype=torch.float64, device=self.theta.device)
        for c0 in range(0, D, chunk):
            c1 = min(D, c0 + chunk)
            E = torch.zeros(c1 - c0, D, dtype=self.theta.dtype, device=self.theta.device)
            E[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1.0
            H[c0:c1] = self.hvp(E).to(torch.float64)
        return 0.5 * (H + H.T)


def top_eigenvalue(loss, n_iter=30, seed=0):
    """The eigenvalue of largest magnitude of the Hessian of ``loss`` (power iteration)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    v = torch.randn(loss.space.dim, generator=g, dtype=torch.float64).to(loss.theta)
    v = v / v.norm()
    lam = 0.0
    for _ in range(int(n_iter)):
        Hv = loss.hvp(v[None])[0]
        lam = float(v @ Hv)
        nrm = Hv.norm()
        if not torch.isfinite(nrm) or nrm == 0:
            break
        v = Hv / nrm
    return lam


def _check_finite(T, what):
    if not bool(torch.isfinite(T).all()):
        raise ValueError(
            f"{what} contains NaN or infinity: check the model's parameters and the training "
            "loss (NaN weights, a diverged training run)."
        )


def _singular_tol(scale, dim, dtype):
    return 10.0 * math.sqrt(max(dim, 1)) * torch.finfo(dtype).eps * scale


# ==========================================================================================
# solvers
# ==========================================================================================
class ExactInverse:
    """``(H + lambda I)^-1`` from the eigendecomposition of the exact Hessian.

    Attributes
    ----------
    eigenvalues_ : tensor (D,)
        Eigenvalues of ``H`` (ascending), float64.
    eigenvectors_ : tensor (D, D)
    """

    name = "exact"

    def __init__(self, damping):
        self.damping = float(damping)

    def fit(self, loss):
        D = loss.space.dim
        check_memory(
            3 * D * D * 8, f"The exact Hessian of {D} parameters (and its eigendecomposition)",
            hint="Use solver='cg', 'lissa' or 'ekfac' (no D x D matrix), or fewer parameters "
                 "(TorchModel(params=...)).",
        )
        H = loss.hessian()
        _check_finite(H, "The Hessian of the training loss")
        w, V = torch.linalg.eigh(H)
        scale = max(float(w.abs().max()), self.damping)
        shifted = w + self.damping
        tol = _singular_tol(scale, D, loss.theta.dtype)
        if scale == 0.0 or bool((shifted.abs() <= tol).any()):
            k = int((shifted.abs() <= tol).sum())
            raise ValueError(
                f"H + damping I is singular (damping={self.damping:g}; {k} of {D} eigenvalues "
                f"within {tol:.2g} of zero; largest |eigenvalue| {scale:.3g}): the Hessian of the "
                "training loss has a null space (e.g. inputs that are always zero, dead units, "
                "more parameters than the data constrain)"
                + (f", or a negative eigenvalue of H (smallest {float(w.min()):.3g}) cancels the "
                   f"damping. Set damping above {-float(w.min()):.3g}, e.g. "
                   f"damping={2 * -float(w.min()):.2g}." if float(w.min()) < -0.5 * self.damping else
                   f". Set damping > 0, e.g. damping={max(1e-3 * scale, 1e-8):.2g}.")
            )
        neg = int((shifted < 0).sum())
        if neg:
            warnings.warn(
                f"H + damping I is not positive definite ({neg} of {D} eigenvalues below "
                f"-damping={-self.damping:g}; smallest eigenvalue of H {float(w[0]):.3g}): the "
                "scores are the exact formula but the influence kernel is not a Gram matrix; "
                f"damping > {-float(w[0]):.3g} makes it positive definite.",
                UserWarning, stacklevel=3,
            )
        self.eigenvalues_, self.eigenvectors_ = w, V
        return self

    def _rot(self, G):
        V = self.eigenvectors_
        return G.to(V) @ V

    def solve(self, G, loss=None):
        R = self._rot(G) / (self.eigenvalues_ + self.damping)
        return R @ self.eigenvectors_.T

    def quad(self, G, loss=None):
        R = self._rot(G)
        return (R * R / (self.eigenvalues_ + self.damping)).sum(1)


class _Iterative:
    """Shared ``quad`` for solvers that only solve."""

    def quad(self, G, loss):
        return (self.solve(G, loss).to(torch.float64) * G.to(torch.float64)).sum(1)


class ConjugateGradient(_Iterative):
    """Conjugate gradient on ``(H + lambda I) x = g``, one independent CG per column, batched.

    Stops a column when ``|(H + lambda I) x - g| <= tol |g|``; columns still above after
    ``n_iter`` iterations raise a :class:`~sklearn.exceptions.ConvergenceWarning`.  CG assumes
    ``H + lambda I`` positive definite; a direction of negative curvature (an indefinite
    system: a network short of a minimum with small damping) gives a warning once, and the
    iteration goes on (its Galerkin iterates stay defined; the residual decides convergence); an
    exact breakdown (zero curvature), or a final relative residual of 1 or more (no better than
    ``x = 0``), a ``ValueError``.  ``history_`` keeps the largest relative residual after each iteration of
    the last solve.
    """

    name = "cg"

    def __init__(self, damping, n_iter, tol):
        self.damping, self.n_iter, self.tol = float(damping), int(n_iter), float(tol)

    def solve(self, B, loss):
        B = B.to(loss.theta.dtype)
        lam = self.damping
        X = torch.zeros_like(B)
        R = B.clone()
        P = R.clone()
        rs = (R * R).sum(1, dtype=torch.float64)
        bn = rs.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        active = rs.sqrt() > self.tol * bn
        self.history_ = []
        self.indefinite_ = getattr(self, "indefinite_", False)
        it = 0
        while bool(active.any()) and it < self.n_iter:
            idx = active.nonzero()[:, 0]
            p = P[idx]
            Ap = loss.hvp(p) + lam * p
            pAp = (p * Ap).sum(1, dtype=torch.float64)
            _check_finite(pAp, "A Hessian-vector product")
            if bool((pAp == 0).any()):
                raise ValueError(
                    f"CG broke down (p^T (H + damping I) p = 0 with damping={lam:g}): H + damping "
                    "I is singular or indefinite. Increase damping, or use solver='ekfac'."
                )
            if bool((pAp < 0).any()) and not self.indefinite_:
                self.indefinite_ = True
                warnings.warn(
                    f"CG met negative curvature (p^T (H + damping I) p = {float(pAp.min()):.3g}, "
                    f"damping={lam:g}): H + damping I is not positive definite, so CG is not "
                    "guaranteed to converge (its residual is still checked). Increase damping "
                    "above minus the smallest eigenvalue of H, or use solver='exact' or 'ekfac'.",
                    UserWarning, stacklevel=3,
                )
            alpha = (rs[idx] / pAp).to(B.dtype)[:, None]
            X[idx] += alpha * p
            R[idx] -= alpha * Ap
            rs_new = (R[idx] * R[idx]).sum(1, dtype=torch.float64)
            beta = (rs_new / rs[idx]).to(B.dtype)[:, None]
            P[idx] = R[idx] + beta * p
            rs[idx] = rs_new
            active[idx] = rs_new.sqrt() > self.tol * bn[idx]
            it += 1
            self.history_.append(float((rs.sqrt() / bn).max()))
        self.n_iter_ = it
        if bool(active.any()):
            worst = float((rs.sqrt() / bn).max())
            if worst >= 1.0:
                # no better than x = 0: returning it would hand out scores of arbitrary sign
                raise ValueError(
                    f"CG failed: relative residual {worst:.2e} >= 1 after n_iter={self.n_iter} "
                    f"iterations (damping={lam:g}"
                    + ("; it met negative curvature, so H + damping I is not positive definite"
                       if self.indefinite_ else "")
                    + "). Increase damping above minus the smallest eigenvalue of H (e.g. 0.1), "
                    "or use solver='ekfac'."
                )
            warnings.warn(
                f"CG did not converge: relative residual {worst:.2e} > tol={self.tol:g} after "
                f"n_iter={self.n_iter} iterations (damping={lam:g}). Increase n_iter, or damping "
                "(fewer iterations: the condition number falls), or use solver='exact' or 'ekfac'.",
                ConvergenceWarning, stacklevel=3,
            )
        return X


class LiSSA(_Iterative):
    """The scaled, damped Neumann series of LiSSA (Agarwal et al., 2017; Koh and Liang, 2017).

    ``u_0 = g``, ``u_j = g + (I - (H_j + lambda I) / s) u_{j-1}``, ``x = u_J / s``, with ``H_j``
    the Hessian of the mean loss over the whole set (``batch_size=None``: the deterministic
    series, whose update is exactly the residual ``g - (H + lambda I) x_j``) or over a minibatch
    of ``batch_size`` examples drawn afresh each step from a generator seeded with ``seed``
    (the stochastic estimator).  It converges when every eigenvalue of ``H + lambda I`` lies in
    ``(0, 2 s)``; it stops when the relative update ``|u_j - u_{j-1}| / |g| <= tol`` (for
    minibatches a noisy residual estimate), warns (``ConvergenceWarning``) if that is not reached
    in ``n_iter`` steps and raises if the series diverges.
    """

    name = "lissa"

    def __init__(self, damping, scale, n_iter, tol, batch_size=None, seed=0):
        self.damping, self.scale = float(damping), float(scale)
        self.n_iter, self.tol = int(n_iter), float(tol)
        self.batch_size, self.seed = batch_size, int(seed)

    def solve(self, B, loss):
        B = B.to(loss.theta.dtype)
        lam, s = self.damping, self.scale
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        n = loss.n
        stochastic = self.batch_size is not None and int(self.batch_size) < n
        bn = B.norm(dim=1).to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
        U = B.clone()
        rel = torch.zeros_like(bn)
        self.history_ = []
        it = 0
        for it in range(1, self.n_iter + 1):
            idx = torch.randperm(n, generator=gen)[: int(self.batch_size)].to(B.device) if stochastic else None
            step = B - (loss.hvp(U, idx) + lam * U) / s
            U += step
            rel = step.norm(dim=1).to(torch.float64) / bn
            self.history_.append(float(rel.max()))
            if not bool(torch.isfinite(rel).all()) or float(rel.max()) > 1e3:
                raise ValueError(
                    f"LiSSA diverged after {it} of n_iter={self.n_iter} steps (relative update "
                    f"{float(rel.max()):.3g}; lissa_scale={s:g}, damping={lam:g}): every eigenvalue "
                    "of H + damping I must lie in (0, 2 lissa_scale). Raise lissa_scale (None "
                    "estimates the largest eigenvalue), raise damping if H has negative "
                    "eigenvalues, or use solver='cg' or 'exact'."
                )
            if float(rel.max()) <= self.tol:
                break
        self.n_iter_ = it
        if float(rel.max()) > self.tol:
            warnings.warn(
                f"LiSSA did not converge: relative update {float(rel.max()):.2e} > tol={self.tol:g} "
                f"after n_iter={self.n_iter} steps (damping={lam:g}, lissa_scale={s:g}"
                + (f", minibatches of {int(self.batch_size)}" if stochastic else "")
                + "). It needs about lissa_scale / (smallest eigenvalue of H + damping) steps per "
                "e-fold: increase n_iter or damping, or use solver='cg'.",
                ConvergenceWarning, stacklevel=3,
            )
        return U / s


# ==========================================================================================
# EK-FAC
# ==========================================================================================
class GGNOutput(ModelOutput):
    """Pseudo-outputs for the Gauss-Newton matrix: ``f(z) = B z`` with ``B = (d^2 l / dz^2)^{1/2}``
    held constant (per example, from the loss's Hessian in the network's outputs).

    The per-example Jacobians ``J_c`` of the ``C`` outputs satisfy ``sum_c J_c^T J_c = J^T
    (d^2 l / dz^2) J``, the example's Gauss-Newton matrix; for cross-entropy this is also the
    (true) Fisher.  ``loss`` is the per-example loss (a checked :class:`LossOutput`).
    """

    def __init__(self, loss):
        self.loss = loss

    def _root(self, z, y):
        def f(zi, yi):
            return self.loss(zi[None], yi[None])[0]

        Hz = vmap(torch.func.hessian(f))(z, y)
        Hz = 0.5 * (Hz + Hz.mT)
        w, V = torch.linalg.eigh(Hz)
        return (V * w.clamp_min(0).sqrt()[:, None, :]) @ V.mT

    def __call__(self, z, y):
        with torch.no_grad():
            B = self._root(z.detach(), y)
        return torch.einsum("ncd,nd->nc", B, z)

    def describe(self):
        return {"type": "ggn", "loss": self.loss.describe()}


def _sandwich(fac, R):
    """``Q_S R Q_A^T`` for a batch ``R`` (t, d_out, d_in), with right products only."""
    return ((R @ fac["QA"].T).mT @ fac["QS"].T).mT


class EKFAC:
    """Eigenvalue-corrected Kronecker-factored ``(F + lambda I)^-1``, block-diagonal by layer.

    ``F`` is the Gauss-Newton matrix of the mean loss (``fisher="ggn"``: gradients of the
    :class:`GGNOutput` pseudo-outputs) or the empirical Fisher ``(1/n) sum_i g_i g_i^T``
    (``fisher="empirical"``: the loss gradients at the training labels).  For a Linear / Conv
    record (weight, with its bias as an extra input column of ones) the block is approximated
    in the eigenbasis ``Q_S (x) Q_A`` of the K-FAC factors ``A = E[sum_s a_s a_s^T]`` (layer
    inputs over positions) and ``S = E[sum_{s,c} d_s d_s^T]`` (output gradients), with the
    eigenvalues replaced by the exact second moments of the per-example gradients in that basis,
    ``Lambda[o, i] = E[sum_c (Q_S^T G_c Q_A)[o, i]^2]`` (George et al., 2018).  Other parameter
    groups (norm layers, embeddings, a bias without its weight, any group under the vmap engine)
    get their exact block ``E[g g^T]`` when it has at most ``dense_max`` entries per side, its
    diagonal otherwise.

    Attributes
    ----------
    factors_ : list of dict
        Per block: ``{"QA", "QS", "lam"}`` (Kronecker) or ``{"V", "lam"}`` (explicit) or
        ``{"lam"}`` (diagonal); ``lam`` are the (corrected) eigenvalues.
    """

    name = "ekfac"

    def __init__(self, damping, dense_max=_DENSE_BLOCK_MAX):
        self.damping, self.dense_max = float(damping), int(dense_max)

    def fit(self, featurizer, space, X, y):
        """Two passes over the training set ``(X, y)`` with ``featurizer`` (exact records)."""
        n = int(X.shape[0])
        dev = X.device
        f64 = torch.float64
        stats = []
        for b in space.blocks:
            if b.kron:
                stats.append({"A": torch.zeros(b.d_in, b.d_in, dtype=f64, device=dev),
                              "S": torch.zeros(b.d_out, b.d_out, dtype=f64, device=dev)})
            else:
                p = b.stop - b.start
                explicit = p <= self.dense_max
                stats.append({"C": torch.zeros(p, p, dtype=f64, device=dev)} if explicit
                             else {"diag": torch.zeros(p, dtype=f64, device=dev)})
        for _, recs in featurizer.dense_batches(X, y):
            for _, _, rc in record_chunks(recs):
                space.check(rc)
                for r, st in zip(rc, stats):
                    if isinstance(r, _grad.KronRecord):
                        a = r.a.flatten(0, 1).to(f64)
                        d = r.d.flatten(0, 2).to(f64)
                        st["A"] += a.T @ a
                        st["S"] += d.T @ d
                    else:
                        g = r.g.flatten(0, 1).to(f64)
                        if "C" in st:
                            st["C"] += g.T @ g
                        else:
                            st["diag"] += (g * g).sum(0)
        factors = []
        for b, st in zip(space.blocks, stats):
            for v in st.values():
                _check_finite(v, f"The curvature statistics of {b.key!r}")
            if b.kron:
                QA = torch.linalg.eigh(st["A"] / n)[1]
                QS = torch.linalg.eigh(st["S"] / n)[1]
                factors.append({"QA": QA, "QS": QS,
                                "lam": torch.zeros(b.d_out, b.d_in, dtype=f64, device=dev)})
            elif "C" in st:
                w, V = torch.linalg.eigh(st["C"] / n)
                factors.append({"V": V, "lam": w.clamp_min(0)})
            else:
                factors.append({"lam": st["diag"] / n})
        if any(b.kron for b in space.blocks):  # eigenvalue corrections
            for _, recs in featurizer.dense_batches(X, y):
                for _, _, rc in record_chunks(recs):
                    for r, fac in zip(rc, factors):
                        if not isinstance(r, _grad.KronRecord):
                            continue
                        da = r.d.to(f64) @ fac["QS"]  # (n, L, m, d_out)
                        aa = r.a.to(f64) @ fac["QA"]  # (n, L, d_in)
                        if r.L == 1:
                            fac["lam"] += torch.einsum("nmo,ni->oi", da[:, 0] ** 2, aa[:, 0] ** 2)
                        else:
                            Gr = torch.einsum("nlmo,nli->nmoi", da, aa)
                            fac["lam"] += (Gr * Gr).sum((0, 1))
            for b, fac in zip(space.blocks, factors):
                if b.kron:
                    fac["lam"] /= n
        self.factors_ = factors
        self.space_ = space
        top = max(float(f["lam"].max()) for f in factors) if factors else 0.0
        low = min(float(f["lam"].min()) for f in factors) if factors else 0.0
        tol = _singular_tol(max(top, self.damping), space.dim, X.dtype if X.is_floating_point()
                            else torch.float64)
        if top == 0.0 and self.damping == 0.0 or low + self.damping <= tol:
            raise ValueError(
                f"The EK-FAC curvature plus damping is singular (damping={self.damping:g}, "
                f"smallest corrected eigenvalue {low:.3g}, largest {top:.3g}): the Gauss-Newton / "
                "Fisher matrix always has a null space (e.g. the softmax's constant direction). "
                f"Set damping > 0, e.g. damping={max(1e-3 * top, 1e-8):.2g}."
            )
        return self

    def _blocks(self, G):
        sp = self.space_
        G = G.to(torch.float64)
        for b, fac in zip(sp.blocks, self.factors_):
            if b.kron:
                # Q_S^T G Q_A for G (t, d_out, d_in), with right products only (a 2-D factor on
                # the left of a batch would be broadcast to a copy per target)
                R = ((sp.to_kron(b, G) @ fac["QA"]).mT @ fac["QS"]).mT
                yield b, fac, R
            elif "V" in fac:
                yield b, fac, G[:, b.start : b.stop] @ fac["V"]
            else:
                yield b, fac, G[:, b.start : b.stop]

    def solve(self, G, loss=None):
        out = torch.empty(G.shape, dtype=torch.float64, device=G.device)
        sp = self.space_
        for b, fac, R in self._blocks(G):
            R = R / (fac["lam"] + self.damping)
            if b.kron:
                out[:, b.start : b.stop] = sp.from_kron(b, _sandwich(fac, R))
            elif "V" in fac:
                out[:, b.start : b.stop] = R @ fac["V"].T
            else:
                out[:, b.start : b.stop] = R
        return out

    def quad(self, G, loss=None):
        out = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
        for _, fac, R in self._blocks(G):
            out += (R * R / (fac["lam"] + self.damping)).flatten(1).sum(1)
        return out

    def matrix(self):
        """The dense ``F_ekfac`` (D, D) (for tests and small models)."""
        D = self.space_.dim
        E = torch.eye(D, dtype=torch.float64, device=self.factors_[0]["lam"].device)
        out = torch.zeros(D, D, dtype=torch.float64, device=E.device)
        sp = self.space_
        for b, fac, R in self._blocks(E):
            R = R * fac["lam"]
            if b.kron:
                out[:, b.start : b.stop] = sp.from_kron(b, _sandwich(fac, R))
            elif "V" in fac:
                out[:, b.start : b.stop] = R @ fac["V"].T
            else:
                out[:, b.start : b.stop] = R
        return out
