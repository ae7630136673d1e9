"""The loss kernel (Adam, Furman and Hoogland, 2025): covariance of per-example losses under SGLD.

``K_ij = Cov_{w ~ p}[l_i(w), l_j(w)]`` with ``p`` the localised tempered posterior around the
trained weights ``w*`` (see :mod:`skattr.sampling`), shown by default as the correlation
``K_ij / sqrt(K_ii K_jj)``.  Every chain's draws are pooled; the covariance is streamed
(Welford / Chan updates), so memory holds the ``n x n`` kernel and not the ``n x draws`` losses.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._validation import check_fitted_shape, check_input, check_memory, seed_from_random_state
from ..model import TorchModel
from ..sampling import (
    LocalPosterior,
    SamplerDiagnosticWarning,
    SGLDSettings,
    StreamingMoments,
    _n_jobs,
    calibrate_step_size,
    calibration_seed,
    chain_seeds,
    default_nbeta,
    effective_sample_size,
    replay_draws,
    sample,
    split_half_reliability,
    split_rhat,
)

__all__ = ["LossKernel"]

_TINY = 1e-300
#: Fitted points whose losses are kept at every draw for the diagnostics.
_N_TRACKED = 128
#: Diagnostic thresholds: split-half reliability below, R-hat above.
_MIN_RELIABILITY = 0.5
_MAX_RHAT = 1.1
#: Fewer effective draws in all than this: entries carry noise above ~1/sqrt(100) = 0.1.
_MIN_TOTAL_ESS = 100


class LossKernel(TransformerMixin, BaseEstimator):
    """Loss kernel: covariance (or correlation) of per-example losses under local SGLD.

    ``fit(X, y)`` runs ``n_chains`` SGLD chains of the localised tempered posterior
    ``p(w) ∝ exp(-nβ L_n(w) - γ/2 |w - w*|²)`` from the trained weights ``w*`` and records the
    per-example losses of ``X`` at every draw; ``kernel_`` is their pooled covariance
    (``kind="covariance"``) or correlation (``kind="correlation"``, the paper's view).
    ``transform(X, y=None)`` returns ``K(X, X_fit)``, evaluated at the *same* draws: the chains
    are replayed bit for bit from their seeds (``keep="seeds"``) or the stored parameter draws are
    reused (``keep="draws"``).

    Parameters
    ----------
    model : TorchModel
        The trained network (deep-copied at ``fit``).
    n_chains : int, default=4
    n_draws : int, default=200
        Draws per chain.
    step_size : float or "auto", default="auto"
        SGLD step size ε.  "auto" calibrates it from the loss traces of short pilot chains
        (:func:`skattr.sampling.calibrate_step_size`): the largest ε on a halving ladder from
        ``min(1/γ, 0.1)`` whose plateau loss no longer moves when ε is halved, i.e. the chain
        leaves ``w*``, settles, and the discretisation does not inflate the loss.  The choice
        is ``step_size_``; the ladder is ``calibration_``.
    localization : float, default=100.0
        Localisation strength γ.
    nbeta : float or None, default=None
        Inverse temperature nβ; None is devinterp's default ``m / ln m`` (``m`` the batch size).
    burn_in : int, default=100
        SGLD steps before the first draw.
    thin : int or "auto", default="auto"
        SGLD steps between draws.  "auto" makes each draw span about 0.6 relaxation times of
        the localisation, ``thin = ceil(1.2 / (step_size * localization))`` (clipped to
        1..20; 5 when ``localization=0``): a smaller step takes more steps per draw, so the
        number of *effective* draws (``ess_``) and the kernel's noise stay about the same.
        The choice is ``thin_``.
    batch_size : int or None, default=None
        SGLD mini-batch size (None: 256, capped at the number of sampling points).
    kind : {"correlation", "covariance"}, default="correlation"
    keep : {"seeds", "draws"} or None, default="seeds"
        What ``transform`` replays: "seeds" re-runs the chains from their seeds (no memory, the
        cost of a fit); "draws" stores every parameter draw (``n_chains * n_draws * n_params``
        float32) and only evaluates; None keeps nothing (``transform`` is unavailable).
    n_jobs : int or None, default=None
        joblib workers for the chains (``-1``: all cores; ``None``: the active
        ``joblib.parallel_config``'s, so ``parallel_config(backend="dask")`` runs the chains on
        a Dask cluster).  Each chain is the same on any worker; the kernel pools the chains'
        accumulators, equal to a one-process fit to float64 rounding (tests/test_dask.py).
    random_state : int, RandomState instance or None, default=0
        Seeds the chains (mini-batches and noise).
    verbose : int, default=0

    Attributes
    ----------
    kernel_ : ndarray of shape (n_fit, n_fit)
        The loss kernel of the fitted points.
    variance_ : ndarray of shape (n_fit,)
        Variance of each point's loss over the draws (the covariance diagonal).
    mean_loss_ : ndarray of shape (n_fit,)
        Mean loss of each point over the draws.
    loss_traces_ : ndarray of shape (n_chains, burn_in + n_draws * ``thin_``)
        Mini-batch loss at every SGLD step of every chain (NaN after a failure).
    draw_losses_ : ndarray of shape (n_chains, n_draws)
        Mean loss of the fitted points at every draw.
    init_loss_ : float
        Mean loss of the sampling data at ``w*``.
    diverged_ : ndarray of shape (n_chains,), bool
        Chains dropped because their loss became NaN/inf.
    far_ : ndarray of shape (n_chains,), bool
        Chains kept but flagged: their loss rose far above ``init_loss_``.
    n_draws_used_ : int
        Draws pooled into the kernel.
    step_size_ : float
        The step size used (calibrated when ``step_size="auto"``).
    thin_ : int
        SGLD steps between draws (chosen when ``thin="auto"``).
    calibration_ : skattr.sampling.Calibration or None
        The pilot ladder of ``step_size="auto"`` (rungs, plateau levels, whether a rung passed).
    diagnostic_points_ : ndarray of int
        Indices of the (up to 128, random) fitted points whose losses are kept at every draw
        for the diagnostics below.
    ess_ : ndarray of shape (n_chains,)
        Effective sample size of each chain: median over the diagnostic points of the ESS of
        their loss series (Geyer's estimator); NaN for a dropped chain.  The kernel's entries
        have a noise of about ``1 / sqrt(ess_.sum())``.
    rhat_ : ndarray of shape (n_chains,)
        Split-R̂ of each chain (its first against its second half of draws; median over the
        diagnostic points): above 1.1 the chain is still drifting.
    rhat_pooled_ : float
        Split-R̂ over all healthy chains (median over the diagnostic points): above 1.1 the
        chains disagree.
    split_half_reliability_ : float
        Correlation between the kernels (on the diagnostic points) of the first and of the
        second halves of the draws.  A :class:`skattr.sampling.SamplerDiagnosticWarning` is
        raised when it is below 0.5 (noise dominates), when ``ess_.sum() < 100`` (too few
        effective draws) or when an R̂ exceeds 1.1.
    chain_seeds_ : list of int
    nbeta_ : float
    batch_size_ : int
    model_ : TorchModel
    n_features_in_ : int
    input_shape_ : tuple

    Notes
    -----
    Memory: ``kernel_`` is ``n_fit²`` float64 and is the only ``n_fit²`` array of a sequential
    fit (the co-moment is streamed into it, ``64 x n_fit`` draws at a time), whatever the number
    of chains and draws.  With ``n_jobs > 1`` each running chain fills its own accumulator
    (``(2 + n_jobs) n_fit²`` in all).  Storing the losses instead would add ``8 n_fit`` bytes per
    draw.
    Labels: ``fit`` uses ``y`` (the network's predictions when None); ``transform`` uses ``y`` or
    the predictions of the new points.  ``fit_transform`` returns ``kernel_`` (fitted labels),
    so a ``Pipeline`` sees the training block with true labels.  For
    ``SpectralClustering(affinity="precomputed")`` use a non-negative affinity, e.g.
    ``np.clip(K, 0, None)``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skattr import TorchModel
    >>> from skattr.estimators.loss_kernel import LossKernel
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 4)).astype("float32")
    >>> y = (X[:, 0] > 0).astype(int)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> model = TorchModel(net, epochs=20, lr=0.1, random_state=0).fit(X, y)
    >>> lk = LossKernel(model, n_chains=2, n_draws=30, burn_in=20).fit(X, y)
    >>> lk.kernel_.shape, lk.loss_traces_.shape == (2, 20 + 30 * lk.thin_)
    ((60, 60), True)
    >>> bool(lk.step_size_ in lk.calibration_.step_sizes), lk.ess_.shape, lk.rhat_.shape
    (True, (2,), (2,))
    >>> bool(np.allclose(np.diag(lk.kernel_), 1.0))
    True
    >>> lk.transform(X[:5]).shape
    (5, 60)
    """

    _parameter_constraints = {
        "model": [TorchModel],
        "n_chains": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_draws": [Interval(numbers.Integral, 2, None, closed="left")],
        "step_size": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "localization": [Interval(numbers.Real, 0, None, closed="left")],
        "nbeta": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "burn_in": [Interval(numbers.Integral, 0, None, closed="left")],
        "thin": [Interval(numbers.Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "kind": [StrOptions({"correlation", "covariance"})],
        "keep": [StrOptions({"seeds", "draws"}), None],
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        model,
        *,
        n_chains=4,
        n_draws=200,
        step_size="auto",
        localization=100.0,
        nbeta=None,
        burn_in=100,
        thin="auto",
        batch_size=None,
        kind="correlation",
        keep="seeds",
        n_jobs=None,
        random_state=0,
        verbose=0,
    ):
        self.model = model
        self.n_chains = n_chains
        self.n_draws = n_draws
        self.step_size = step_size
        self.localization = localization
        self.nbeta = nbeta
        self.burn_in = burn_in
        self.thin = thin
        self.batch_size = batch_size
        self.kind = kind
        self.keep = keep
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_clone__(self):
        # The network is what this kernel is *of*: keep its trained weights through clone.
        params = self.get_params(deep=False)
        new = {k: copy.deepcopy(v) if k == "model" else clone(v, safe=False) for k, v in params.items()}
        return type(self)(**new)

    # ------------------------------------------------------------------ helpers
    def _check_model(self):
        if not isinstance(self.model, TorchModel):
            raise TypeError(
                f"model must be a skattr.TorchModel, got {type(self.model).__name__}; wrap your "
                "network as TorchModel(module)."
            )

    def _labels(self, model, Xt, y, name="y"):
        """Encoded targets of ``Xt``: ``y`` checked against the model, or its predictions."""
        n = int(Xt.shape[0])
        if y is None:
            z = model.logits(Xt)
            if model.task == "regression":
                return z
            return z.argmax(1) if z.shape[1] > 1 else (z[:, 0] > 0).long()
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if model.task == "regression":
            yy = y.reshape(n, -1) if y.size and y.shape[0] == n else y
            if y.shape[0] == n and yy.shape[1] != model.n_outputs_:
                raise ValueError(
                    f"{name} has {yy.shape[1]} target column(s) but the model outputs "
                    f"{model.n_outputs_} value(s) per sample."
                )
        try:
            return model.encode_y(y, n)
        except TypeError as e:  # e.g. string labels against integer classes
            raise ValueError(
                f"{name} has labels of dtype {y.dtype} that cannot be matched to the model's "
                f"classes {model.class_labels().tolist()[:20]}: {e}"
            ) from e

    def _settings(self, n_sample, step_size=None):
        bs = min(int(self.batch_size or 256), int(n_sample))
        nbeta = float(self.nbeta) if self.nbeta is not None else default_nbeta(bs)
        eps = 1e-4 if step_size is None and self.step_size == "auto" else float(
            self.step_size if step_size is None else step_size)
        gamma = float(self.localization)
        if self.thin != "auto":
            thin = int(self.thin)
        elif gamma > 0:
            thin = int(min(20, max(1, math.ceil(1.2 / (eps * gamma)))))
        else:
            thin = 5
        return SGLDSettings(
            step_size=eps, localization=gamma, nbeta=nbeta,
            n_draws=int(self.n_draws), burn_in=int(self.burn_in), thin=thin,
            batch_size=bs,
        ).validate()

    def _check_losses_finite(self, post, Xt, yt, what):
        L = post.per_example_losses(post.net, Xt, yt)
        bad = ~torch.isfinite(L)
        if bool(bad.any()):
            idx = torch.nonzero(bad).flatten()[:5].tolist()
            raise ValueError(
                f"The per-example losses of {what} at the trained weights are NaN/inf for "
                f"{int(bad.sum())} of {L.numel()} examples (first indices {idx}): check the "
                "model's weights and outputs (NaN parameters?) and the targets."
            )

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, *, X_sample=None, y_sample=None):
        """Sample the local posterior and compute the loss kernel of ``X``.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
            Points whose per-example losses are recorded at every draw.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their labels (targets for regression); None uses the network's predictions.
        X_sample, y_sample : default=None
            Data whose mean loss defines the posterior (the SGLD mini-batches); defaults to
            ``(X, y)``.  Usually the training set.

        Returns
        -------
        self
        """
        self._validate_params()
        self._check_model()
        X = check_input(X)
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = tuple(X.shape[1:])
        self.model_ = copy.deepcopy(self.model)
        self.model_.prepare(X[:1])
        Xt = self.model_.to_tensor(X)
        yt = self._labels(self.model_, Xt, y)
        if X_sample is None:
            if y_sample is not None:
                raise ValueError("y_sample was given without X_sample.")
            Xs, ys = Xt, yt
        else:
            Xs = self.model_.to_tensor(check_input(X_sample, name="X_sample"), name="X_sample")
            check_fitted_shape(Xs, self.input_shape_, name="X_sample")
            ys = self._labels(self.model_, Xs, y_sample, name="y_sample")
        n = int(Xt.shape[0])
        jobs = _n_jobs(self.n_jobs, self.n_chains)
        n_mat = 1 if jobs == 1 else 2 + jobs
        check_memory(
            8 * n * n * n_mat,
            f"The loss kernel of {n} points ({n_mat} float64 {n}x{n} matrices)",
            hint="Fit on fewer points or lower n_jobs.",
        )
        post = LocalPosterior(self.model_, Xs, ys)
        self._check_losses_finite(post, Xs, ys, "the sampling data")
        if Xs is not Xt:
            self._check_losses_finite(post, Xt, yt, "X")
        seed = seed_from_random_state(self.random_state)
        settings = self._settings(Xs.shape[0])
        self.calibration_ = None
        if self.step_size == "auto":
            self.calibration_ = calibrate_step_size(post, settings, calibration_seed(seed))
            settings = self._settings(Xs.shape[0], self.calibration_.step_size)
        seeds = chain_seeds(seed, self.n_chains)
        track = np.sort(np.random.default_rng(seed).choice(n, min(n, _N_TRACKED), replace=False))
        if self.keep == "draws":
            check_memory(
                4 * post.n_params * settings.n_draws * self.n_chains,
                f"Storing {self.n_chains} x {settings.n_draws} parameter draws of "
                f"{post.n_params} parameters",
                hint="Use keep='seeds' (replay) instead.",
            )
        res = sample(
            post, settings, seeds, probes=[(Xt, yt)],
            make_observer=functools.partial(StreamingMoments, n),
            keep_draws=self.keep == "draws", n_jobs=self.n_jobs, verbose=self.verbose,
            track=track,
        )
        obs = res.observer
        self.mean_loss_ = obs.mean_a.copy()
        self.variance_ = obs.variances()
        K = obs.covariance(inplace=True)  # F-ordered and symmetric: K.T is the C-ordered view
        if self.kind == "correlation":
            _to_correlation(K, self.variance_, self.variance_, symmetric=True)
        self.kernel_ = K.T
        self.loss_traces_ = res.loss_traces
        self.draw_losses_ = res.draw_losses
        self.init_loss_ = res.init_loss
        self.diverged_ = res.failed
        self.far_ = res.far
        self.n_draws_used_ = int(res.n_draws_used)
        self.chain_seeds_ = list(seeds)
        self.nbeta_ = settings.nbeta
        self.batch_size_ = settings.batch_size
        self.step_size_ = settings.step_size
        self.thin_ = settings.thin
        self.diagnostic_points_ = track
        self._diagnose(res.tracked, res.failed)
        self.n_fit_ = n
        self._post = post
        self._settings_ = settings
        self._fit_probe = (Xt, yt)
        self.draws_ = res.draws if self.keep == "draws" else None
        return self

    def _diagnose(self, tracked, failed):
        """Set ``ess_``, ``rhat_``, ``rhat_pooled_``, ``split_half_reliability_``; warn."""
        n_chains = len(failed)
        self.ess_ = np.full(n_chains, np.nan)
        self.rhat_ = np.full(n_chains, np.nan)
        ok = ~np.asarray(failed, bool)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN medians (constant losses)
            for c in np.flatnonzero(ok):
                self.ess_[c] = np.nanmedian(effective_sample_size(tracked[c]))
                self.rhat_[c] = np.nanmedian(split_rhat(tracked[c][None]))
            good = tracked[ok]
            self.rhat_pooled_ = float(np.nanmedian(split_rhat(good))) if len(good) else np.nan
            self.split_half_reliability_ = split_half_reliability(good, self.kind)
        problems = []
        r = self.split_half_reliability_
        if np.isfinite(r) and r < _MIN_RELIABILITY:
            problems.append(
                f"noise dominates the kernel: the kernels of the two halves of the draws "
                f"correlate at only {r:.2f} (split_half_reliability_ < {_MIN_RELIABILITY})"
            )
        total = float(np.nansum(self.ess_))
        if ok.any() and total < _MIN_TOTAL_ESS:
            problems.append(
                f"too few effective draws: {total:.0f} in all (sum of ess_ < {_MIN_TOTAL_ESS}), "
                f"so the kernel's entries carry noise of about {1 / np.sqrt(max(total, 1)):.2f}"
            )
        worst = np.nanmax(np.r_[self.rhat_, self.rhat_pooled_]) if ok.any() else np.nan
        if np.isfinite(worst) and worst > _MAX_RHAT:
            problems.append(
                f"the chains have not mixed: split R-hat up to {worst:.3g} (> {_MAX_RHAT}; "
                f"rhat_ per chain {np.round(self.rhat_, 3).tolist()}, pooled "
                f"{self.rhat_pooled_:.3g})"
            )
        cal = self.calibration_
        if cal is not None and not cal.accepted:
            problems.append(
                f"step_size='auto' found no step size whose loss plateau is stable (tried "
                f"{cal.step_sizes[0]:.3g} down to {cal.step_sizes[-1]:.3g}; took "
                f"{cal.step_size:.3g})"
            )
        if problems:
            warnings.warn(
                "LossKernel: " + "; ".join(problems) + f". Effective draws per chain (ess_): "
                f"{np.round(self.ess_, 1).tolist()} with step_size={self.step_size_:.3g}, "
                f"thin={self.thin_}, n_draws={self.n_draws}. "
                + ("Raise" if self.step_size == "auto" else "Use step_size='auto', or raise")
                + " thin, n_draws or n_chains; check loss_traces_ (the loss should rise above "
                "init_loss_ and plateau).",
                SamplerDiagnosticWarning,
                stacklevel=3,
            )

    def fit_transform(self, X, y=None, **fit_params):
        """Fit and return ``kernel_`` (a copy), the kernel of ``X`` with its own labels."""
        return self.fit(X, y, **fit_params).kernel_.copy()

    # ------------------------------------------------------------------ transform
    def transform(self, X, y=None):
        """Loss kernel ``K(X, X_fit)`` of shape (n_samples, n_fit), at the fitted draws.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like, default=None
            Labels of ``X``; None uses the network's predictions.
        """
        check_is_fitted(self, "kernel_")
        X = check_input(X)
        check_fitted_shape(X, self.input_shape_)
        if self.keep is None:
            raise ValueError(
                "This LossKernel was fitted with keep=None: the draws cannot be replayed for new "
                "points. Refit with keep='seeds' (replay) or keep='draws' (stored draws)."
            )
        Xt = self.model_.to_tensor(X)
        yt = self._labels(self.model_, Xt, y)
        post = self._post
        self._check_losses_finite(post, Xt, yt, "X")
        Xf, yf = self._fit_probe
        make = functools.partial(StreamingMoments, int(Xt.shape[0]), self.n_fit_)
        alive = [s for s, bad in zip(self.chain_seeds_, self.diverged_) if not bad]
        if self.keep == "draws":
            obs = None
            for d in self.draws_:
                if d is None:
                    continue
                o = replay_draws(post, d, probes=[(Xt, yt), (Xf, yf)], observer=make())
                obs = o if obs is None else obs.merge(o)
        else:
            res = sample(
                post, self._settings_, alive, probes=[(Xt, yt), (Xf, yf)], make_observer=make,
                n_jobs=self.n_jobs, verbose=self.verbose, warn=False,
            )
            obs = res.observer
        va, vb = obs.variances()
        C = np.ascontiguousarray(obs.covariance(inplace=True))
        if self.kind == "correlation":
            _to_correlation(C, va, vb, symmetric=False)
        return C

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags


def _to_correlation(C, va, vb, *, symmetric):
    """Divide ``C`` in place by ``sqrt(va_i vb_j)``; rows/columns of zero variance become 0."""
    da = np.where(va > _TINY, 1.0 / np.sqrt(np.maximum(va, _TINY)), 0.0)
    db = np.where(vb > _TINY, 1.0 / np.sqrt(np.maximum(vb, _TINY)), 0.0)
    C *= da[:, None]
    C *= db[None, :]
    np.clip(C, -1.0, 1.0, out=C)
    if symmetric:
        idx = np.arange(C.shape[0])
        C[idx, idx] = np.where(va > _TINY, 1.0, 0.0)
    return C
