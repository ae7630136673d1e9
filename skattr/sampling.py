"""Seeded SGLD sampling of the localised tempered posterior around trained weights.

The target is (methods.md §5)

.. math::

    p(w) \\propto \\exp\\big(-n\\beta\\, L_n(w) - \\tfrac{\\gamma}{2}\\lVert w - w^*\\rVert^2\\big),

with ``L_n`` the mean training loss, ``w*`` the trained weights, ``nβ`` the inverse temperature
and ``γ`` the localisation strength.  One SGLD step on a random mini-batch ``B`` is

.. math::

    w \\leftarrow w - \\tfrac{\\varepsilon}{2}\\big(n\\beta\\, \\nabla L_B(w) + \\gamma (w - w^*)\\big)
        + \\sqrt{\\varepsilon}\\, \\xi, \\qquad \\xi \\sim N(0, I),

the update of devinterp's ``SGLD`` optimizer.  Every chain starts at ``w*``, runs ``burn_in``
steps, then takes a draw after every ``thin``-th step (``n_draws`` draws; the first draw follows
step ``burn_in``, as in devinterp).  The network is evaluated in eval mode (frozen batch norm, no
dropout) for the SGLD steps and the draws alike.

Chains are independent and seeded: chain ``c`` uses the ``c``-th child of
``numpy.random.SeedSequence(seed)`` for its mini-batches and its noise, so a run is reproducible
whatever ``n_jobs``, and a chain can be *replayed* bit for bit from its seed (this is how
:class:`skattr.estimators.loss_kernel.LossKernel` evaluates new points without storing the
parameter draws).

Diagnostics: every chain records its mini-batch loss at every step (``loss_traces``) and the
mean loss of the first probe set at every draw (``draw_losses``).  A chain whose loss becomes
NaN or infinite is stopped, dropped from the statistics and reported with a
:class:`SamplerDivergenceWarning`; a chain whose (smoothed) loss rises far above the starting
loss is kept but reported with the same warning; if every chain fails, a ``FloatingPointError``
says so and what to change.

Self-checks (used by :class:`skattr.estimators.loss_kernel.LossKernel`):
:func:`calibrate_step_size` chooses ε from short pilot chains (the largest ε on a halving ladder
whose loss plateau no longer moves when ε is halved: the chain moves, settles, and the
discretisation does not inflate the plateau); :func:`effective_sample_size`,
:func:`split_rhat` and :func:`split_half_reliability` measure, from the losses of a few tracked
points at every draw, how many independent draws a chain is worth, whether the chains agree
and are stationary, and whether the kernel is signal or noise.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import blas
from sklearn.exceptions import ConvergenceWarning

__all__ = [
    "SamplerDivergenceWarning",
    "SamplerDiagnosticWarning",
    "Calibration",
    "calibrate_step_size",
    "calibration_seed",
    "effective_sample_size",
    "split_rhat",
    "split_half_reliability",
    "SGLDSettings",
    "LocalPosterior",
    "ChainResult",
    "SamplingResult",
    "StreamingMoments",
    "default_nbeta",
    "chain_seeds",
    "run_chain",
    "replay_draws",
    "sample",
]


class SamplerDivergenceWarning(ConvergenceWarning):
    """An SGLD chain diverged (NaN/inf loss) or wandered far above the starting loss."""


class SamplerDiagnosticWarning(ConvergenceWarning):
    """The draws are too few, too autocorrelated or too inconsistent for a reliable kernel."""


def default_nbeta(batch_size):
    """devinterp's default inverse temperature ``m / ln m`` for mini-batch size ``m``."""
    m = int(batch_size)
    return float(m / math.log(m)) if m > 1 else 1.0


def chain_seeds(random_state_seed, n_chains):
    """One 63-bit seed per chain: children of ``numpy.random.SeedSequence(seed)``."""
    ss = np.random.SeedSequence(int(random_state_seed))
    return [int(c.generate_state(1, np.uint64)[0]) & (2**63 - 1) for c in ss.spawn(int(n_chains))]


def calibration_seed(random_state_seed):
    """The seed of the pilot chains of :func:`calibrate_step_size` (distinct from every chain's)."""
    ss = np.random.SeedSequence([int(random_state_seed), 0x5CA1E])
    return int(ss.generate_state(1, np.uint64)[0]) & (2**63 - 1)


@dataclass(frozen=True)
class SGLDSettings:
    """Hyper-parameters of one SGLD run (see the module docstring for the update)."""

    step_size: float = 1e-4
    localization: float = 100.0
    nbeta: float = 1.0
    n_draws: int = 100
    burn_in: int = 100
    thin: int = 1
    batch_size: int = 256
    divergence_factor: float = 10.0

    @property
    def n_steps(self):
        return int(self.burn_in) + int(self.n_draws) * int(self.thin)

    def validate(self):
        for name in ("step_size", "nbeta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
        if not (math.isfinite(self.localization) and self.localization >= 0):
            raise ValueError(
                f"localization must be a non-negative finite number, got {self.localization!r}."
            )
        if int(self.n_draws) < 1 or int(self.thin) < 1 or int(self.batch_size) < 1:
            raise ValueError("n_draws, thin and batch_size must be positive integers.")
        if int(self.burn_in) < 0:
            raise ValueError(f"burn_in must be >= 0, got {self.burn_in!r}.")
        return self


class LocalPosterior:
    """The sampling problem: a network, its trained weights ``w*`` and the data of ``L_n``.

    Parameters
    ----------
    model : skattr.TorchModel
        Fitted (or wrapping a trained module); its ``params`` prefixes choose which parameters
        are sampled (the others stay at their trained values).
    X, y_encoded : tensors on the model's device
        The data whose mean loss ``L_n`` defines the posterior (``y_encoded`` as returned by
        ``model.encode_y``).
    """

    def __init__(self, model, X, y_encoded):
        self.model = model
        self.net = model.network()
        prefixes = model.prefixes_
        self.names = [
            n for n, p in self.net.named_parameters()
            if p.requires_grad and (prefixes is None or any(n.startswith(pf) for pf in prefixes))
        ]
        if not self.names:
            raise ValueError(
                f"params={model.params!r} selects no trainable parameter of "
                f"{type(self.net).__name__}: there is nothing to sample."
            )
        named = dict(self.net.named_parameters())
        self.w_star = [named[n].detach().clone() for n in self.names]
        self.numels = [int(p.numel()) for p in self.w_star]
        self.n_params = int(sum(self.numels))
        self.X = X
        self.y = y_encoded
        self.batch_size_eval = int(model.batch_size_eval)

    # -- helpers used inside a chain ---------------------------------------------------------
    def copy_network(self):
        net = copy.deepcopy(self.net).eval()
        named = dict(net.named_parameters())
        for n, p in named.items():
            if n not in self.names:
                p.requires_grad_(False)
        return net, [named[n] for n in self.names]

    def _loss(self, net, xb, yb):
        z = net(xb)
        z = z[:, None] if z.ndim == 1 else z
        return self.model.loss_fn(z, yb)

    @torch.no_grad()
    def per_example_losses(self, net, X, y):
        """Per-example losses (n,) of ``(X, y)`` at the network's current weights, in float64.

        The loss is computed from float64 logits: a float32 cross-entropy rounds to exactly 0
        once the margin passes ~17, which would leave confident examples with no variance.
        """
        out = []
        bs = self.batch_size_eval
        for i in range(0, X.shape[0], bs):
            z = net(X[i : i + bs])
            z = (z[:, None] if z.ndim == 1 else z).double()
            yb = y[i : i + bs]
            out.append(self.model.loss_fn(z, yb.double() if yb.is_floating_point() else yb))
        return torch.cat(out)

    @torch.no_grad()
    def initial_loss(self):
        net = self.net
        return float(self.per_example_losses(net, self.X, self.y).double().mean())

    def flat(self, params):
        return torch.cat([p.detach().reshape(-1) for p in params])

    @torch.no_grad()
    def load_flat(self, params, w):
        i = 0
        for p, k in zip(params, self.numels):
            p.copy_(w[i : i + k].view_as(p))
            i += k


# ---------------------------------------------------------------------------- streaming moments
class StreamingMoments:
    """Pooled mean and co-moment of vectors seen one draw at a time (Welford / Chan et al.).

    ``StreamingMoments(n)`` accumulates the ``n x n`` co-moment ``M = sum_t (a_t - mean)(a_t -
    mean)^T`` of vectors ``a_t`` of length ``n``; ``StreamingMoments(n, m)`` the ``n x m`` cross
    co-moment of pairs ``(a_t, b_t)`` plus both diagonals.  Draws are buffered ``block`` at a
    time and folded in with one BLAS rank-``block`` update (``dsyrk`` / ``dgemm``), so memory is
    the ``n x n`` (or ``n x m``) matrix plus ``block`` rows, whatever the number of draws.
    Accumulators from different chains merge exactly with :meth:`merge` (pairwise formula of Chan,
    Golub and LeVeque), so the result pools every chain's draws.
    """

    def __init__(self, n, m=None, block=64):
        self.n = int(n)
        self.m = None if m is None else int(m)
        self.block = int(block)
        self.count = 0
        self.mean_a = np.zeros(self.n)
        self.M = np.zeros((self.n, self.n if m is None else self.m), order="F")
        if m is not None:
            self.mean_b = np.zeros(self.m)
            self.ssq_a = np.zeros(self.n)
            self.ssq_b = np.zeros(self.m)
        self._buf_a = None
        self._buf_b = None
        self._k = 0

    @property
    def symmetric(self):
        return self.m is None

    def update(self, a, b=None):
        """Add one draw: ``a`` (n,) (and ``b`` (m,) for a cross co-moment)."""
        if self._buf_a is None:
            self._buf_a = np.empty((self.block, self.n))
            if not self.symmetric:
                self._buf_b = np.empty((self.block, self.m))
        self._buf_a[self._k] = a
        if not self.symmetric:
            self._buf_b[self._k] = b
        self._k += 1
        if self._k == self.block:
            self.flush()

    def on_draw(self, losses):
        """Observer hook of :func:`run_chain`: ``losses`` is the list of probe-loss arrays."""
        if self.symmetric:
            self.update(losses[0])
        else:
            self.update(losses[0], losses[1])

    def flush(self):
        """Fold the buffered draws into the accumulator (called by :meth:`update` and at the end)."""
        k = self._k
        if k == 0:
            return self
        A = self._buf_a[:k]
        mu_a = A.mean(0)
        if self.symmetric:
            self._fold(k, mu_a, A - mu_a, None, None)
        else:
            B = self._buf_b[:k]
            mu_b = B.mean(0)
            self._fold(k, mu_a, A - mu_a, mu_b, B - mu_b)
        self._k = 0
        return self

    def _fold(self, k, mu_a, Ca, mu_b, Cb):
        """Merge a group of ``k`` draws with means ``mu`` and centred rows ``C`` (k, n)."""
        n0 = self.count
        N = n0 + k
        w = math.sqrt(n0 * k / N)
        da = mu_a - self.mean_a
        Aa = np.vstack([Ca, w * da[None]]) if n0 else Ca
        if self.symmetric:
            # M += Aa^T Aa, upper triangle only (symmetrised on read)
            blas.dsyrk(1.0, np.asfortranarray(Aa.T), beta=1.0, c=self.M, trans=0, lower=0,
                       overwrite_c=1)
        else:
            db = mu_b - self.mean_b
            Ab = np.vstack([Cb, w * db[None]]) if n0 else Cb
            blas.dgemm(1.0, np.asfortranarray(Aa.T), np.asfortranarray(Ab), beta=1.0, c=self.M,
                       overwrite_c=1)
            self.ssq_a += (Aa**2).sum(0)
            self.ssq_b += (Ab**2).sum(0)
            self.mean_b += db * (k / N)
        self.mean_a += da * (k / N)
        self.count = N

    def merge(self, other):
        """Pool ``other`` (another chain's accumulator of the same shape) into ``self``."""
        self.flush()
        other.flush()
        if other.count == 0:
            return self
        if self.count == 0:
            self.__dict__.update(other.__dict__)
            return self
        if self.symmetric:
            self.M += other.M  # upper triangles add up; the lower one is ignored
            self._fold(other.count, other.mean_a, np.zeros((0, self.n)), None, None)
        else:
            self.M += other.M
            self.ssq_a += other.ssq_a
            self.ssq_b += other.ssq_b
            self._fold(other.count, other.mean_a, np.zeros((0, self.n)), other.mean_b,
                       np.zeros((0, self.m)))
        return self

    def covariance(self, inplace=False):
        """Sample covariance, co-moment / (count - 1), as a float64 array.

        ``inplace=True`` turns the internal buffer into the result (no second ``n x n`` array)
        and consumes the accumulator: read :meth:`variances` first.
        """
        self.flush()
        if self.count < 2:
            raise ValueError(f"Need at least 2 draws for a covariance, have {self.count}.")
        if self.M is None:
            raise RuntimeError("This accumulator was consumed by covariance(inplace=True).")
        M = self.M if inplace else self.M.copy(order="F")
        if self.symmetric:
            _symmetrize_from_upper(M)
        M /= self.count - 1
        if inplace:
            self.M = None
        return M

    def variances(self):
        """Per-coordinate variances: ``var_a`` (symmetric) or ``(var_a, var_b)``."""
        self.flush()
        d = max(self.count - 1, 1)
        if self.symmetric:
            return np.diag(self.M).copy() / d
        return self.ssq_a / d, self.ssq_b / d


def _symmetrize_from_upper(M, block=1024):
    """Copy the upper triangle onto the lower one in place, a block of columns at a time."""
    n = M.shape[0]
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        M[j1:, j0:j1] = M[j0:j1, j1:].T
        blk = M[j0:j1, j0:j1]
        M[j0:j1, j0:j1] = np.triu(blk) + np.triu(blk, 1).T
    return M


# merge() folds two groups via _fold, which adds k=other.count on top of self.count: correct,
# because the within-group co-moments were added to M beforehand and _fold with zero centred
# rows contributes exactly the between-group term n_a n_b / N * delta delta^T.


# ---------------------------------------------------------------------------- chains
@dataclass
class ChainResult:
    """What one chain produced."""

    chain: int
    seed: int
    trace: np.ndarray  # mini-batch loss at every step (NaN after a failure)
    draw_losses: np.ndarray  # mean loss of the first probe set at every draw (NaN if missing)
    n_draws_done: int = 0
    failed: bool = False  # NaN/inf: the chain is dropped
    far: bool = False  # loss far above the start: kept, reported
    message: str = ""
    observer: object = None
    draws: np.ndarray | None = None
    tracked: np.ndarray | None = None  # (n_draws, k) losses of the tracked probe points


def _smoothed_max(trace, window):
    t = trace[np.isfinite(trace)]
    if t.size == 0:
        return float("nan")
    w = max(1, min(int(window), t.size))
    c = np.convolve(t, np.ones(w) / w, mode="valid")
    return float(c.max())


def run_chain(post, settings, seed, *, chain=0, probes=(), observer=None, make_observer=None,
              keep_draws=False, init_loss=None, threads=None, track=None):
    """Run one SGLD chain from ``w*``.

    Parameters
    ----------
    post : LocalPosterior
    settings : SGLDSettings
    seed : int
        Seeds this chain's mini-batches and noise (a ``torch.Generator``).
    probes : sequence of (X, y_encoded) tensors
        Sets whose per-example losses are evaluated at every draw and handed to ``observer``.
    observer : object with ``on_draw(list_of_numpy_losses)``, optional
        Receives the probe losses (float64 numpy arrays) at every draw.
    make_observer : callable, optional
        Builds the observer here (in the worker) when ``observer`` is None.
    keep_draws : bool
        Keep the flat parameter vector at every draw (``n_draws x n_params`` floats).
    init_loss : float, optional
        The loss at ``w*`` (for the "far above" check); computed when None.
    track : array-like of int, optional
        Indices into the first probe set whose losses are kept at every draw
        (``ChainResult.tracked``, for the diagnostics).

    Returns
    -------
    ChainResult
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    if observer is None and make_observer is not None:
        observer = make_observer()
    s = settings
    net, params = post.copy_network()
    w0 = [p.detach().clone() for p in params]
    dev, dt = post.X.device, post.X.dtype
    g = torch.Generator(device=dev)
    g.manual_seed(int(seed))
    N = int(post.X.shape[0])
    m = min(int(s.batch_size), N)
    n_steps = s.n_steps
    trace = np.full(n_steps, np.nan)
    draw_losses = np.full(int(s.n_draws), np.nan)
    draws = np.empty((int(s.n_draws), post.n_params), dtype=np.float32) if keep_draws else None
    track = None if track is None else np.asarray(track, dtype=np.int64)
    tracked = None if track is None else np.full((int(s.n_draws), track.size), np.nan)
    half_eps_nbeta = -0.5 * float(s.step_size) * float(s.nbeta)
    lerp_w = 0.5 * float(s.step_size) * float(s.localization)
    if lerp_w >= 1.0:
        # the localisation alone overshoots w* every step: an unstable discretisation
        raise ValueError(
            f"step_size * localization / 2 = {lerp_w:.3g} >= 1: the SGLD update overshoots the "
            "localisation centre and diverges. Lower step_size or localization."
        )
    sqrt_eps = math.sqrt(float(s.step_size))
    res = ChainResult(chain=int(chain), seed=int(seed), trace=trace, draw_losses=draw_losses,
                      observer=observer, draws=draws, tracked=tracked)
    full = m == N  # full-batch gradients: no shuffling needed
    perm = None if full else torch.randperm(N, generator=g, device=dev)
    pos = 0
    draw = 0
    for t in range(n_steps):
        if full:
            xb, yb = post.X, post.y
        else:
            if pos + m > N:
                perm = torch.randperm(N, generator=g, device=dev)
                pos = 0
            idx = perm[pos : pos + m]
            pos += m
            xb, yb = post.X[idx], post.y[idx]
        loss = post._loss(net, xb, yb).mean()
        grads = torch.autograd.grad(loss, params)
        lv = float(loss.detach())
        trace[t] = lv
        if not math.isfinite(lv):
            res.failed = True
            res.message = (
                f"chain {chain}: the mini-batch loss became {lv} at step {t} of {n_steps}"
            )
            break
        with torch.no_grad():
            noise = torch.randn(post.n_params, generator=g, device=dev, dtype=dt)
            noises = [v.view_as(p) for v, p in zip(noise.split(post.numels), params)]
            if lerp_w:
                torch._foreach_lerp_(params, w0, lerp_w)
            torch._foreach_add_(params, grads, alpha=half_eps_nbeta)
            torch._foreach_add_(params, noises, alpha=sqrt_eps)
        if t >= s.burn_in and (t - s.burn_in) % s.thin == 0:
            losses = [post.per_example_losses(net, Xp, yp) for Xp, yp in probes]
            bad = [i for i, L in enumerate(losses) if not bool(torch.isfinite(L).all())]
            if bad:
                L = losses[bad[0]]
                nbad = int((~torch.isfinite(L)).sum())
                res.failed = True
                res.message = (
                    f"chain {chain}: {nbad} of {L.numel()} per-example losses are NaN/inf at draw "
                    f"{draw} (step {t})"
                )
                break
            if losses:
                draw_losses[draw] = float(losses[0].mean())
                if tracked is not None:
                    tracked[draw] = losses[0].cpu().numpy()[track]
            if observer is not None:
                observer.on_draw([L.cpu().numpy() for L in losses])
            if keep_draws:
                draws[draw] = post.flat(params).cpu().numpy()
            draw += 1
    res.n_draws_done = draw
    if not res.failed:
        if init_loss is None:
            init_loss = post.initial_loss()
        thresh = float(s.divergence_factor) * max(init_loss, 0.0) + 1.0
        peak = _smoothed_max(trace, 10)
        if peak > thresh:
            res.far = True
            res.message = (
                f"chain {chain}: the loss rose to {peak:.4g} (smoothed over 10 steps), far above "
                f"the starting loss {init_loss:.4g} (threshold {thresh:.4g})"
            )
    if observer is not None and hasattr(observer, "flush"):
        observer.flush()
    return res


def replay_draws(post, draws, *, probes=(), observer=None):
    """Evaluate ``probes`` at stored parameter ``draws`` (n_draws, n_params) for ``observer``."""
    net, params = post.copy_network()
    dev, dt = post.X.device, post.X.dtype
    for w in draws:
        post.load_flat(params, torch.as_tensor(w, device=dev, dtype=dt))
        losses = [post.per_example_losses(net, Xp, yp) for Xp, yp in probes]
        observer.on_draw([L.cpu().numpy() for L in losses])
    if hasattr(observer, "flush"):
        observer.flush()
    return observer


# ---------------------------------------------------------------------------- many chains
@dataclass
class SamplingResult:
    """Pooled output of :func:`sample`."""

    loss_traces: np.ndarray  # (n_chains, n_steps)
    draw_losses: np.ndarray  # (n_chains, n_draws)
    init_loss: float
    seeds: list
    failed: np.ndarray  # (n_chains,) bool: dropped
    far: np.ndarray  # (n_chains,) bool: kept, reported
    messages: list = field(default_factory=list)
    observer: object = None  # merged over the chains that did not fail
    draws: list | None = None  # per chain (n_draws, n_params) float32, when kept
    n_draws_used: int = 0
    tracked: np.ndarray | None = None  # (n_chains, n_draws, k) losses of the tracked points


def _n_jobs(n_jobs, n_chains):
    from joblib import effective_n_jobs

    return max(1, min(int(effective_n_jobs(n_jobs)), int(n_chains)))


def sample(post, settings, seeds, *, probes=(), make_observer=None, keep_draws=False, n_jobs=None,
           verbose=0, raise_on_failure=True, warn=True, track=None):
    """Run one chain per seed (in parallel with joblib when ``n_jobs`` allows) and pool them.

    Parameters
    ----------
    post : LocalPosterior
    settings : SGLDSettings
    seeds : list of int
        One per chain (see :func:`chain_seeds`); a chain is fully determined by its seed.
    probes : sequence of (X, y_encoded) tensors, evaluated at every draw.
    make_observer : callable () -> observer, optional
        Builds an accumulator (``on_draw``, ``flush``, ``merge``).  Sequential chains
        (``n_jobs=1``) share one; parallel chains fill one each in their worker, merged as they
        finish.  Chains that fail are left out of ``SamplingResult.observer`` either way.
    keep_draws : bool
    n_jobs : int, default=None
        joblib processes (``None``: one, ``-1``: all cores); capped at the number of chains.
    raise_on_failure : bool
        Raise ``FloatingPointError`` when every chain failed.
    track : array-like of int, optional
        Indices into the first probe set whose losses are kept at every draw
        (``SamplingResult.tracked``).

    Returns
    -------
    SamplingResult
    """
    settings.validate()
    init_loss = post.initial_loss()
    if not math.isfinite(init_loss):
        raise ValueError(
            f"The loss at the trained weights is {init_loss}: the model's outputs or the labels "
            "give a NaN/inf loss before any sampling step."
        )
    n_chains = len(seeds)
    jobs = _n_jobs(n_jobs, n_chains)
    # Sequential chains share one accumulator (memory: one n x n matrix, whatever the number of
    # chains and draws); a chain that fails is removed by recomputing the accumulator from the
    # healthy chains' seeds (exact, since chains are deterministic).  Parallel chains each fill
    # their own accumulator in the worker, merged here as they finish.
    shared = None if (make_observer is None or jobs > 1) else make_observer()

    def _runs(seed_list, observer):
        if jobs == 1:
            return (
                run_chain(post, settings, s, chain=c, probes=probes, observer=observer,
                          keep_draws=keep_draws, init_loss=init_loss, track=track)
                for c, s in seed_list
            )
        from joblib import Parallel, delayed

        # joblib's process backend caps each worker's threads (OMP_NUM_THREADS) at
        # cores // n_jobs; under parallel_backend("threading") the chains share the process.
        return Parallel(n_jobs=jobs, return_as="generator")(
            delayed(run_chain)(post, settings, s, chain=c, probes=probes,
                               make_observer=make_observer, keep_draws=keep_draws,
                               init_loss=init_loss, track=track)
            for c, s in seed_list
        )

    it = _runs(list(enumerate(seeds)), shared)
    if verbose:
        from tqdm.auto import tqdm

        it = tqdm(it, total=n_chains, desc="SGLD chains", leave=False)
    traces = np.full((n_chains, settings.n_steps), np.nan)
    dl = np.full((n_chains, int(settings.n_draws)), np.nan)
    failed = np.zeros(n_chains, bool)
    far = np.zeros(n_chains, bool)
    messages = []
    merged = None
    draws = [] if keep_draws else None
    tracked = (None if track is None
               else np.full((n_chains, int(settings.n_draws), len(track)), np.nan))
    used = 0
    for r in it:
        traces[r.chain] = r.trace
        dl[r.chain] = r.draw_losses
        failed[r.chain] = r.failed
        far[r.chain] = r.far
        if r.message:
            messages.append(r.message)
        if keep_draws:
            draws.append(None if r.failed else r.draws)
        if tracked is not None and r.tracked is not None:
            tracked[r.chain] = r.tracked
        if r.failed:
            continue
        used += r.n_draws_done
        if shared is None and r.observer is not None:
            merged = r.observer if merged is None else merged.merge(r.observer)
    if shared is not None:
        merged = shared
        if failed.any() and not failed.all():
            merged = make_observer()
            healthy = [(c, s) for c, s in enumerate(seeds) if not failed[c]]
            for _ in _runs(healthy, merged):
                pass  # the tracked losses of these chains are unchanged (deterministic replay)
    if warn and (failed.any() or far.any()):
        warnings.warn(
            _divergence_message(settings, failed, far, messages, init_loss),
            SamplerDivergenceWarning,
            stacklevel=3,
        )
    if raise_on_failure and failed.all():
        raise FloatingPointError(
            f"All {n_chains} SGLD chains diverged: {messages[0] if messages else ''}. "
            f"Lower step_size (now {settings.step_size:g}), or raise localization (now "
            f"{settings.localization:g}), or lower nbeta (now {settings.nbeta:g})."
        )
    return SamplingResult(
        loss_traces=traces, draw_losses=dl, init_loss=init_loss, seeds=list(seeds),
        failed=failed, far=far, messages=messages, observer=merged, draws=draws,
        n_draws_used=used, tracked=tracked,
    )


def _divergence_message(s, failed, far, messages, init_loss):
    parts = []
    if failed.any():
        parts.append(
            f"{int(failed.sum())} of {len(failed)} SGLD chains diverged (NaN/inf loss) and were "
            "dropped"
        )
    if far.any():
        parts.append(
            f"{int(far.sum())} of {len(far)} chains rose far above the starting loss "
            f"{init_loss:.4g} (kept)"
        )
    return (
        "; ".join(parts) + ". " + " | ".join(messages[:4])
        + f". The step size {s.step_size:g} is probably too large for nbeta={s.nbeta:g}, "
        f"localization={s.localization:g}: lower step_size or raise localization, and check "
        "loss_traces_."
    )


# ---------------------------------------------------------------------------- step size
@dataclass
class Calibration:
    """Result of :func:`calibrate_step_size`: the ladder of pilot chains and the choice."""

    step_size: float  # the chosen ε
    step_sizes: np.ndarray  # the rungs tried, largest first
    levels: np.ndarray  # plateau level of each rung: mean mini-batch loss, last half of its pilot
    init_loss: float
    accepted: bool  # False: no rung passed; the smallest finite rung was taken
    n_steps: int


def calibrate_step_size(post, settings, seed, *, n_steps=200, factor=2.0, tol=0.05, max_rungs=8,
                        init_loss=None):
    """Choose the SGLD step size ε from the loss traces of short pilot chains.

    Rungs ``ε_k = ε_0 / factor**k`` are tried from the largest down, with
    ``ε_0 = min(1 / γ, 0.1)`` (so ``ε γ / 2 <= 1/2``, well inside the stable range of the
    localisation term).  Each rung runs one pilot chain of ``n_steps`` steps from ``w*`` (the
    same mini-batches and noise for every rung) and records its *plateau level*, the mean
    mini-batch loss over the last half of the pilot.  A rung is accepted when halving ε moves
    that level by at most ``tol`` times the chain's displacement from the starting loss,

    ``|level(ε_k) - level(ε_{k+1})| <= tol * |level(ε_{k+1}) - L(w*)|``,

    i.e. the chain has moved away from ``w*`` and settled within the pilot, and the
    discretisation no longer inflates the level (too large a step raises the plateau, or
    diverges; too small a step has not yet moved: the level then keeps changing with ε).

    Parameters
    ----------
    post : LocalPosterior
    settings : SGLDSettings
        Every field but ``step_size`` (and the chain length) is used as is.
    seed : int
        Seed of the pilot chains (:func:`calibration_seed`).
    n_steps : int, default=200
        Steps per pilot chain.
    factor : float, default=2.0
        Ratio of consecutive rungs.
    tol : float, default=0.05
    max_rungs : int, default=8
        When no rung passes, the rung whose level moved least when ε was halved is taken (and
        ``Calibration.accepted`` is False).
    init_loss : float, optional
        Mean loss of the sampling data at ``w*``; computed when None.

    Returns
    -------
    Calibration
    """
    s = settings
    if init_loss is None:
        init_loss = post.initial_loss()
    gamma = float(s.localization)
    eps0 = min(1.0 / gamma, 0.1) if gamma > 0 else 0.1
    half = int(n_steps) // 2
    eps_list, levels, changes = [], [], []
    chosen, accepted = None, False
    for k in range(int(max_rungs)):
        eps = eps0 / float(factor) ** k
        pilot = dataclasses.replace(s, step_size=eps, burn_in=int(n_steps) - 1, n_draws=1,
                                    thin=1)
        r = run_chain(post, pilot, seed, init_loss=init_loss)
        tr = r.trace[half : int(n_steps)]
        level = float(tr.mean()) if (not r.failed and not r.far and np.isfinite(tr).all()) \
            else float("inf")
        eps_list.append(eps)
        levels.append(level)
        if k >= 1:
            disp = abs(level - init_loss)
            change = (abs(levels[-2] - level) / disp
                      if math.isfinite(levels[-2]) and math.isfinite(level) and disp > 0
                      else float("inf"))
            changes.append(change)
            if change <= tol:
                chosen, accepted = eps_list[-2], True
                break
    if chosen is None:
        best = int(np.argmin(changes)) if changes else 0
        chosen = eps_list[best] if math.isfinite(changes[best] if changes else 0.0) \
            else eps_list[-1]
    return Calibration(step_size=float(chosen), step_sizes=np.asarray(eps_list),
                       levels=np.asarray(levels), init_loss=float(init_loss), accepted=accepted,
                       n_steps=int(n_steps))


# ---------------------------------------------------------------------------- diagnostics
def effective_sample_size(x):
    """Effective sample size of each column of ``x`` (n_draws, ...), one chain.

    Geyer's initial monotone sequence estimator: ``n / tau`` with
    ``tau = -1 + 2 sum_k P_k``, ``P_k = rho_{2k} + rho_{2k+1}`` summed while positive and made
    non-increasing (``rho`` the FFT autocorrelation).  Capped at ``n log10(n)`` (antithetic
    draws); NaN for a constant column or fewer than 4 draws.
    """
    x = np.asarray(x, dtype=float)
    shape = x.shape[1:]
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    out = np.full(x.shape[1], np.nan)
    if n < 4:
        return out.reshape(shape) if shape else float(out[0]) if out.size else out
    xc = x - x.mean(0)
    var = (xc**2).mean(0)
    ok = np.isfinite(var) & (var > 0)
    if ok.any():
        f = np.fft.rfft(xc[:, ok], 2 * n, axis=0)
        acf = np.fft.irfft(f * np.conj(f), axis=0)[:n] / (n * var[ok])
        m = n // 2
        P = acf[: 2 * m : 2] + acf[1 : 2 * m : 2]  # (m, k)
        pos = np.cumprod(P > 0, axis=0).astype(bool)
        P = np.minimum.accumulate(np.where(pos, P, 0.0), axis=0)
        tau = np.maximum(-1.0 + 2.0 * P.sum(0), 1.0 / np.log10(max(n, 10)))
        out[ok] = n / tau
    out = out.reshape(shape)
    return float(out) if not shape else out


def split_rhat(chains):
    """Split-R̂ (Gelman et al.) of draws ``chains`` (n_chains, n_draws, ...), per column.

    Each chain is split into its two halves, which are compared as separate chains: values
    near 1 mean the halves (and chains) agree; above ~1.1, the chains have not mixed or are
    still drifting.  With one chain it is the within-chain stationarity check.
    """
    c = np.asarray(chains, dtype=float)
    n = c.shape[1] // 2
    if n < 2:
        return np.full(c.shape[2:], np.nan) if c.ndim > 2 else float("nan")
    halves = np.concatenate([c[:, :n], c[:, n : 2 * n]], axis=0)  # (2m, n, ...)
    means = halves.mean(1)
    W = halves.var(1, ddof=1).mean(0)
    B = n * means.var(0, ddof=1)
    var_plus = (n - 1) / n * W + B / n
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(var_plus / W)
    r = np.where(W > 0, r, np.nan)
    return float(r) if np.ndim(r) == 0 else r


def split_half_reliability(losses, kind="correlation"):
    """Correlation between the kernels of the two halves of the draws.

    Parameters
    ----------
    losses : ndarray of shape (n_chains, n_draws, k)
        Per-example losses of ``k`` points at every draw of every (healthy) chain.
    kind : {"correlation", "covariance"}, default="correlation"

    Returns
    -------
    float
        Pearson correlation, over the ``k (k - 1) / 2`` off-diagonal entries, between the
        kernel of the first halves of the chains and that of the second halves (NaN when
        undefined).  1 is a noise-free kernel; the kernel of all the draws has reliability
        about ``2 r / (1 + r)`` (Spearman-Brown); below 0.5 the differences between entries
        are mostly sampling noise.
    """
    L = np.asarray(losses, dtype=float)
    if L.ndim != 3 or L.shape[2] < 3 or L.shape[1] < 4:
        return float("nan")
    h = L.shape[1] // 2
    iu = np.triu_indices(L.shape[2], 1)
    vals = []
    for part in (L[:, :h], L[:, h : 2 * h]):
        A = part.reshape(-1, L.shape[2])
        A = A[np.isfinite(A).all(1)]
        if A.shape[0] < 3:
            return float("nan")
        C = np.cov(A.T)
        if kind == "correlation":
            d = np.sqrt(np.clip(np.diag(C), 0, None))
            d = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
            C = C * d[:, None] * d[None, :]
        vals.append(C[iu])
    a, b = vals
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
