"""Influence functions (Koh and Liang, 2017) at the final parameters, four ways.

The score of training example ``z_i`` for a target ``x`` is

    tau(x, z_i) = grad l(x)^T (H + lambda I)^{-1} grad l(z_i),

``l`` the model's per-example training loss (:class:`~skattr.outputs.LossOutput`), ``H`` the
Hessian of the *mean* training loss over the fitted set at the model's parameters (only the
selected ones, ``model.prefixes_``) and ``lambda = damping`` (absolute).  Up-weighting ``z_i`` by
``eps`` in the mean loss moves the parameters by ``-eps (H + lambda I)^-1 grad l(z_i)`` and the
loss at ``x`` by ``-eps tau``: positive scores mean the example helped (lowered the loss at
``x``); removing it raises that loss by about ``tau / n_train``.

Built on :class:`~skattr.estimators.base.BaseAttributor`: the training features are the
featuriser's loss gradients (exact, or projected with ``projection_dim``) scored with the
identity preconditioner; each target's exact gradient is preconditioned in parameter space by
the solver (:mod:`skattr.hessian`), then projected with the very map the training features were
projected with (:func:`skattr.hessian.project_like`).  Solvers: ``"exact"`` (eigendecomposition
of ``H``), ``"cg"``, ``"lissa"`` (HVPs of the mean loss) and ``"ekfac"`` (eigenvalue-corrected
Kronecker factors of the Gauss-Newton matrix, which replaces ``H``).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from joblib.parallel import get_active_backend
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .. import gradients as _grad
from ..featurize import Featurizer, progress
from ..hessian import (
    EKFAC,
    ConjugateGradient,
    ExactInverse,
    GGNOutput,
    LiSSA,
    ParamSpace,
    TrainingLoss,
    project_like,
    record_chunks,
    top_eigenvalue,
)
from ..parallel import _shard, n_workers, run_blocks
from .base import BaseAttributor

__all__ = ["InfluenceFunction"]

_DEFAULT_ITER = {"cg": 200, "lissa": 2000}
_SOLVER_STATE = ("history_", "n_iter_", "indefinite_")  # what a solve leaves on the solver
_INDEFINITE = "CG met negative curvature"


class _Solves:
    """What solving a block of rows needs, and nothing of the estimator's stored features (a
    process or Dask worker receives it): the featuriser of the exact loss gradients, the
    parameter space, the fitted solver and, for ``"cg"`` / ``"lissa"``, the training loss its
    HVPs are of."""

    def __init__(self, fz, space, curvature, loss, feature_dim, device, verbose=0, name=""):
        self.fz, self.space, self.curvature, self.loss = fz, space, curvature, loss
        self.feature_dim, self.device, self.verbose, self.name = feature_dim, device, verbose, name

    def batches(self, X, y_enc):
        """``(i0, i1, records, G)``: exact loss-gradient records and their flat gradients
        ``G`` (rows, D), batch by batch."""
        for i0, recs in self.fz.dense_batches(X, y_enc):
            for c0, c1, rc in record_chunks(recs):
                self.space.check(rc)
                G = _grad.flatten(rc)[:, 0]
                if not bool(torch.isfinite(G).all()):
                    raise ValueError("The loss gradients contain NaN or infinity.")
                yield i0 + c0, i0 + c1, rc, G

    def rows(self, X, y_enc):
        """``P (H + damping I)^{-1} grad l(x) / sqrt(k)`` (or unprojected), float64 (t, k)."""
        proj = self.fz.projector()
        out = torch.empty(int(X.shape[0]), self.feature_dim, dtype=torch.float64,
                          device=self.device)
        batches = self.batches(X, y_enc)
        for i0, i1, rc, G in progress(batches, None, self.verbose, f"{self.name}: solving"):
            Y = self.curvature.solve(G, self.loss)
            if proj is None:
                out[i0:i1] = Y.to(torch.float64)
            else:
                o = torch.zeros(i1 - i0, proj.k, dtype=proj.dtype, device=proj.device)
                project_like(proj, rc, self.space, Y.to(proj.dtype), o)
                out[i0:i1] = o.to(torch.float64) / math.sqrt(proj.k)
        return out

    def solved(self, X, y_enc):
        """``((H + damping I)^{-1} G, G)``, both float64 (t, D), for the kernel."""
        A, GX = [], []
        for _, _, _, G in self.batches(X, y_enc):
            A.append(self.curvature.solve(G, self.loss).to(torch.float64))
            GX.append(G.to(torch.float64))
        return torch.cat(A), torch.cat(GX)

    def quad(self, X, y_enc):
        """``G^T (H + damping I)^{-1} G`` per row, float64 (t,)."""
        out = torch.empty(int(X.shape[0]), dtype=torch.float64, device=self.device)
        for i0, i1, _, G in self.batches(X, y_enc):
            out[i0:i1] = self.curvature.quad(G, self.loss)
        return out


def _solve_block(solves, what, X, y_enc):
    """One block of rows in a worker: the result of ``solves.<what>`` and the state the solve
    left on the solver (merged by the caller)."""
    out = getattr(solves, what)(X, y_enc)
    state = {k: getattr(solves.curvature, k) for k in _SOLVER_STATE if hasattr(solves.curvature, k)}
    return out, state


class InfluenceFunction(BaseAttributor):
    """Influence functions: ``grad l(x)^T (H + damping I)^{-1} grad l(z_i)`` (Koh and Liang, 2017).

    ``fit(X_train, y_train)`` computes the training loss gradients and the solver's curvature;
    ``attribute(X, y)`` returns ``(n_samples, n_train)`` scores (positive: up-weighting training
    example ``i`` lowers the loss at ``x``, it helped); ``transform(X)`` attributes the model's
    own predictions; ``self_influence()`` is ``grad l_i^T (H + damping I)^{-1} grad l_i``;
    ``kernel(X, Y)`` the symmetric kernel ``grad l(x)^T (H + damping I)^{-1} grad l(x')``.

    Parameters
    ----------
    model : TorchModel
        The trained network, attributed at its parameters (the selected ones, ``params``).
    solver : {"exact", "cg", "lissa", "ekfac"}, default="exact"
        How ``(H + damping I)^{-1}`` is applied.  ``"exact"``: eigendecomposition of the exact
        Hessian of the mean training loss (assembled from Hessian-vector products; ``D x D``
        for ``D`` parameters, small models).  ``"cg"``: conjugate gradient with HVPs of the mean
        training loss, per target.  ``"lissa"``: the scaled Neumann series (LiSSA), per target.
        ``"ekfac"``: EK-FAC, the Gauss-Newton matrix (or the empirical Fisher, ``fisher``) in
        place of ``H``, block-diagonal by layer with eigenvalue-corrected Kronecker factors
        (:class:`skattr.hessian.EKFAC`); always positive definite with ``damping > 0``.
    damping : float >= 0, default=0.01
        ``lambda``, absolute (added to every eigenvalue of the mean loss's Hessian).  A model
        trained with weight decay ``wd`` has ``wd`` in its objective's Hessian: pass ``damping
        >= wd`` to include it.  0 raises if ``H`` is singular (``"exact"``, ``"ekfac"``).
    projection_dim : int or None, default=None
        ``None``: exact gradients (features of ``D`` columns).  An integer projects the training
        gradients and the preconditioned target gradients with one random map
        (:mod:`skattr.projection`) so scores are ``(P M g(x)) . (P g_i) / k``, an unbiased
        estimate; the solver still works on exact gradients.
    projection : {"kronecker", "factored", "rademacher", "gaussian", "sparse"}, default="kronecker"
        Kind of projection.
    n_iter : int or None, default=None
        Iterations of ``"cg"`` (default 200) or steps of ``"lissa"`` (default 2000).
    tol : float > 0, default=1e-5
        ``"cg"`` / ``"lissa"`` stop when ``|(H + damping I) x - g| <= tol |g|`` (for LiSSA with
        minibatches: the stochastic update's size); not reaching it within ``n_iter`` gives a
        :class:`~sklearn.exceptions.ConvergenceWarning`.
    lissa_scale : float > 0 or None, default=None
        LiSSA's scale ``s``: it converges when every eigenvalue of ``H + damping I`` lies in
        ``(0, 2 s)``.  ``None``: the largest eigenvalue of ``H`` (30 power iterations) plus
        ``damping`` (in ``lissa_scale_``).
    lissa_batch_size : int or None, default=None
        LiSSA's Hessian per step: ``None`` the whole training set (the deterministic series);
        an integer a minibatch of that many examples drawn per step (seeded by
        ``random_state``), the stochastic estimator of Agarwal et al. / Koh and Liang.
    fisher : {"ggn", "empirical"}, default="ggn"
        ``"ekfac"`` only: the curvature it factors.  ``"ggn"``: the Gauss-Newton matrix ``(1/n)
        sum_i J_i^T (d^2 l / dz^2) J_i`` (equal to the true Fisher for cross-entropy, to ``H``
        for a model linear in its parameters); ``"empirical"``: ``(1/n) sum_i g_i g_i^T``.
    store, block_size, method, batch_size, random_state, verbose
        As for :class:`~skattr.estimators.TRAK`: an on-disk feature store (resumable), store
        block size, gradient engine, gradient batch size, seeds (projection, LiSSA's
        minibatches), progress bars.
    n_jobs : int or None, default=None
        joblib workers (``None``: the active ``joblib.parallel_config``'s, one by default) for
        the featurisation of the training set by blocks, blockwise scoring (``out=``,
        ``top_k``) and the solves: one job per gradient batch (``batch_size`` rows) of the
        targets of :meth:`attribute` / :meth:`kernel` and of the training set in
        :meth:`self_influence`.  Every batch is solved as in one process (LiSSA's minibatches
        are drawn from the generator seeded by ``random_state`` afresh for each batch, so they
        do not depend on which worker runs it); the results do not depend on ``n_jobs`` or
        the backend.  The solver's ``history_`` and ``n_iter_`` are those of the last batch,
        as in one process; its warnings are re-emitted here in batch order.

    Attributes
    ----------
    curvature_ : ExactInverse, ConjugateGradient, LiSSA or EKFAC
        The fitted solver (:mod:`skattr.hessian`).
    n_params_ : int
        ``D``, the number of parameters differentiated.
    hessian_eigenvalues_ : ndarray of shape (D,)
        ``"exact"``: eigenvalues of ``H`` (ascending).
    lissa_scale_ : float
        ``"lissa"``: the scale used.
    models_, preconditioners_, feature_dim_, store_, n_train_, n_features_in_, input_shape_
        As for every :class:`~skattr.estimators.base.BaseAttributor`.

    Notes
    -----
    The model's training data are kept (``"cg"`` / ``"lissa"`` need HVPs of the training loss
    whenever targets are scored; every solver recomputes exact training gradients for
    ``self_influence()`` when ``projection_dim`` is set).  See the documentation page
    ``influence.html``.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators.influence import InfluenceFunction
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    >>> model = TorchModel(net, epochs=5, lr=0.1, random_state=0).fit(X[:200], y[:200])
    >>> inf = InfluenceFunction(model, solver="exact", damping=0.2).fit(X[:200], y[:200])
    >>> inf.attribute(X[200:203], y[200:203]).shape
    (3, 200)
    >>> ek = InfluenceFunction(model, solver="ekfac", damping=0.2).fit(X[:200], y[:200])
    >>> bool((ek.self_influence() > 0).all())
    True
    """

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "solver": [StrOptions({"exact", "cg", "lissa", "ekfac"})],
        "damping": [Interval(numbers.Real, 0, None, closed="left")],
        "n_iter": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "lissa_scale": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "lissa_batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "fisher": [StrOptions({"ggn", "empirical"})],
        "n_jobs": [numbers.Integral, None],
    }

    def __init__(
        self,
        model,
        *,
        solver="exact",
        damping=0.01,
        projection_dim=None,
        projection="kronecker",
        n_iter=None,
        tol=1e-5,
        lissa_scale=None,
        lissa_batch_size=None,
        fisher="ggn",
        store=None,
        block_size=4096,
        method="auto",
        batch_size=None,
        random_state=0,
        n_jobs=None,
        verbose=0,
    ):
        self.model = model
        self.solver = solver
        self.damping = damping
        self.projection_dim = projection_dim
        self.projection = projection
        self.n_iter = n_iter
        self.tol = tol
        self.lissa_scale = lissa_scale
        self.lissa_batch_size = lissa_batch_size
        self.fisher = fisher
        self.store = store
        self.block_size = block_size
        self.method = method
        self.batch_size = batch_size
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def _get_output(self):
        return "loss"

    def _training_loss(self):
        fz = self._featurizer(0)
        X, y = self._train
        return TrainingLoss(fz.net, self.output_, self.space_, X, y, fz.batch_size)

    def _after_fit(self, X, y, y_enc):
        model = self.models_[0]
        fz = self._featurizer(0)
        Xt = model.to_tensor(X)
        yt = y_enc[0]
        self._train = (Xt, yt)
        for _, _, F, _ in self._features.iter_blocks(0):
            if not np.all(np.isfinite(F)):
                raise ValueError(
                    "The training loss gradients contain NaN or infinity: check the model's "
                    "parameters (NaN weights, a diverged training run)."
                )
        self.space_ = ParamSpace(fz.net, fz.records(Xt[:1], yt[:1]))
        self.n_params_ = self.space_.dim
        loss = self._training_loss()
        if not math.isfinite(loss.value()):
            raise ValueError("The training loss is NaN or infinite at the model's parameters.")
        lam = float(self.damping)
        n_iter = self.n_iter or _DEFAULT_ITER.get(self.solver, 1)
        if self.solver == "exact":
            self.curvature_ = ExactInverse(lam).fit(loss)
        elif self.solver == "cg":
            self.curvature_ = ConjugateGradient(lam, n_iter, self.tol)
        elif self.solver == "lissa":
            scale = self.lissa_scale
            if scale is None:
                scale = abs(top_eigenvalue(loss, 30, self._seed)) + lam
                if not math.isfinite(scale) or scale <= 0:
                    raise ValueError(
                        f"Cannot pick lissa_scale: the Hessian's largest eigenvalue estimate is "
                        f"{scale - lam:g} and damping={lam:g}; pass lissa_scale."
                    )
            self.curvature_ = LiSSA(lam, scale, n_iter, self.tol, self.lissa_batch_size, self._seed)
        else:
            out = GGNOutput(self.output_) if self.fisher == "ggn" else self.output_
            gfz = Featurizer(model, out, projection_dim=None, projection=self.projection, seed=0,
                             method=self.method, batch_size=self.batch_size)
            self.curvature_ = EKFAC(lam).fit(gfz, self.space_, Xt, yt)

    @property
    def hessian_eigenvalues_(self):
        """Eigenvalues of the exact Hessian (``solver="exact"``), ascending."""
        check_is_fitted(self, "curvature_")
        if not isinstance(self.curvature_, ExactInverse):
            raise AttributeError("hessian_eigenvalues_ exists for solver='exact' only.")
        return self.curvature_.eigenvalues_.cpu().numpy()

    @property
    def lissa_scale_(self):
        """The LiSSA scale used (``solver="lissa"``)."""
        check_is_fitted(self, "curvature_")
        if not isinstance(self.curvature_, LiSSA):
            raise AttributeError("lissa_scale_ exists for solver='lissa' only.")
        return self.curvature_.scale

    # ------------------------------------------------------------------ preconditioned targets
    def _solves(self, j=0):
        loss = self._training_loss() if self.solver in ("cg", "lissa") else None
        return _Solves(self._featurizer(j), self.space_, self.curvature_, loss, self.feature_dim_,
                       self._device, self.verbose, self._name())

    def _blockwise(self, what, X, y_enc, j=0, desc="solving"):
        """``solves.<what>`` over ``X``: in this process with one worker (:func:`n_workers`),
        else one joblib job per gradient batch of ``X`` (:func:`skattr.parallel.run_blocks`),
        the blocks' results in order, the solver's state and warnings merged here."""
        solves = self._solves(j)
        if n_workers(self.n_jobs) == 1:
            return [getattr(solves, what)(X, y_enc)]
        if solves.loss is not None and getattr(get_active_backend()[0], "uses_threads", False):
            warnings.warn(
                f"{self._name()}: the {self.solver} solves run one after another in this process "
                "under a thread-based joblib backend: their Hessian-vector products use torch's "
                "forward-mode AD, which is not thread-safe (concurrent solves in threads return "
                "wrong results). Use process workers (loky, Dask) for parallel solves.",
                UserWarning, stacklevel=3,
            )
            return [getattr(solves, what)(X, y_enc)]
        bs, n = solves.fz.batch_size, int(X.shape[0])
        spans = [(i0, min(n, i0 + bs)) for i0 in range(0, n, bs)]
        args = [(solves, what, _shard(X, i0, i1), None if y_enc is None else _shard(y_enc, i0, i1))
                for i0, i1 in spans]
        rows = "training rows" if what == "quad" else "rows"
        names = [f"the {self.solver} solve of {rows} {i0}:{i1}" for i0, i1 in spans]
        curv, outs = self.curvature_, []
        for out, caught in run_blocks(_solve_block, args, names, n_jobs=self.n_jobs,
                                      verbose=self.verbose, desc=f"{self._name()}: {desc}",
                                      replay=False):
            res, state = out
            was_indefinite = getattr(curv, "indefinite_", False)
            for category, message in caught:
                if message.startswith(_INDEFINITE) and was_indefinite:
                    continue  # warned once per solver, as in one process
                warnings.warn(message, category, stacklevel=3)
            for k, v in state.items():
                setattr(curv, k, (v or was_indefinite) if k == "indefinite_" else v)
            outs.append(res)
        return outs

    def _gradient_batches(self, X, y_enc):
        """``(i0, i1, records, G)``: exact loss-gradient records and their flat gradients
        ``G`` (rows, D), batch by batch."""
        return self._solves().batches(X, y_enc)

    def _preconditioned_rows(self, j, X, y_enc, raw=None):
        """``P (H + damping I)^{-1} grad l(x) / sqrt(k)`` (or unprojected), float64 (t, k).

        ``raw`` (the projected features of ``X``, when the caller has them) is not used: the
        solver needs the exact gradients."""
        return torch.cat(self._blockwise("rows", X, y_enc, j))

    def _target_rows(self, j, X, y_enc):
        return self._preconditioned_rows(j, X, y_enc).cpu().numpy()

    def kernel(self, X, Y=None):
        """The symmetric kernel ``g(x)^T (H + damping I)^{-1} g(x')``, ``(n_X, n_Y)``.

        From the exact loss gradients at the network's predicted labels, also when
        ``projection_dim`` is set (a projection on both sides of ``M`` would not keep it
        positive semi-definite); a Gram matrix on any set when ``H + damping I`` is positive
        definite (always for ``solver="ekfac"``).  ``Y=None`` means ``Y = X``.
        """
        X = self._check_X(X)
        same = Y is None
        Y = X if same else self._check_X(Y)
        yX = self._labels(self.models_, X, None)[0]
        parts = self._blockwise("solved", X, yX)
        A = torch.cat([a for a, _ in parts])
        if same:
            B = torch.cat([g for _, g in parts])
        else:
            yY = self._labels(self.models_, Y, None)[0]
            B = torch.cat([G.to(torch.float64) for _, _, _, G in self._gradient_batches(Y, yY)])
        K = A @ B.T
        if same:
            K = 0.5 * (K + K.T)
        return K.cpu().numpy()

    def self_influence(self):
        """``grad l_i^T (H + damping I)^{-1} grad l_i`` for every training example, (n_train,).

        From the exact training gradients (also when ``projection_dim`` is set).  Large values
        flag examples the model fits only through themselves (e.g. mislabelled ones).
        """
        check_is_fitted(self, "curvature_")
        X, y = self._train
        out = torch.cat(self._blockwise("quad", X, y, desc="self-influence"))
        return out.cpu().numpy()
