"""KernelSurrogate: a kernel machine on a network's kernel, fitted to the network's outputs."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from scipy.stats import kendalltau
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_classifier
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.svm import SVC, SVR
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ..estimators.base import AttributionKernel, BaseAttributor
from ..estimators.ntk import EmpiricalNTK
from .fidelity import class_scores, fidelity_from_scores, label_positions

__all__ = ["KernelSurrogate"]


def _make_estimator(estimator, random_state, K):
    """The kernel machine for ``estimator`` fitted on the training kernel ``K``."""
    if estimator == "kglm":
        return SGDClassifier(
            loss="log_loss", penalty="l2", alpha=1e-4, class_weight="balanced",
            max_iter=1000, tol=1e-4, random_state=random_state,
        )
    if estimator == "klr":
        return LogisticRegression(C=1.0, max_iter=5000)
    if estimator == "svc":
        return SVC(kernel="precomputed")
    if estimator == "krr":
        # a ridge relative to the kernel's scale: 1e-3 for a normalised kernel, and for an
        # unnormalised one still well above float32 rounding of its largest eigenvalues (which
        # would otherwise make K + alpha I indefinite and send KernelRidge to lstsq)
        scale = float(np.mean(np.diag(K)))
        return KernelRidge(kernel="precomputed", alpha=1e-3 * (scale if np.isfinite(scale) and scale > 0 else 1.0))
    if estimator == "svr":
        return SVR(kernel="precomputed")
    if isinstance(estimator, str):
        raise ValueError(
            f"estimator must be 'kglm', 'klr', 'svc', 'krr', 'svr' or an sklearn estimator, got {estimator!r}."
        )
    return clone(estimator)


class KernelSurrogate(ClassifierMixin, BaseEstimator):
    """A kernel machine ``s(x) = sum_j w_j K(x, x_j) + b`` standing in for a network.

    ``kernel`` (a skattr kernel transformer) is fitted on the training set and the kernel
    machine ``estimator`` on the train x train kernel matrix.  With ``y=None`` the targets are
    the network's own outputs (its predicted labels for classifiers; its logits for regressors
    such as kernel ridge), which is what a *surrogate* of the network should imitate.

    Parameters
    ----------
    kernel : skattr kernel transformer or attributor
        E.g. ``TraceNTK(model)``; its ``model`` is the network being imitated.  An attributor
        (``TRAK(model)``, ``TracIn(model)``, ...) is used through
        :class:`~skattr.estimators.base.AttributionKernel`, the symmetric kernel it defines.
    estimator : {"kglm", "klr", "svc", "krr", "svr"} or sklearn estimator, default="kglm"
        "kglm": ``SGDClassifier(loss="log_loss", penalty="l2", alpha=1e-4,
        class_weight="balanced")`` on the kernel matrix used as features (the eNTK paper's kGLM);
        "klr": the same generalised linear model solved to convergence,
        ``LogisticRegression(C=1.0)`` (multinomial, lbfgs) on the kernel matrix: much more
        faithful on many classes (10-class digits MLP: Kendall tau 0.79 against 0.38 for kGLM);
        "svc": ``SVC(kernel="precomputed")``; "krr": ``KernelRidge(kernel="precomputed")`` with
        ``alpha = 1e-3 x`` the mean diagonal of the training kernel (1e-3 for a normalised kernel),
        regressing the network's logits (or, for a regression network, its outputs); "svr":
        ``SVR(kernel="precomputed")`` on a single output.  Any estimator taking the kernel matrix
        as ``X``.  A regression network (``task="regression"``) needs a regressor ("krr",
        "svr"); its surrogate's ``predict`` gives outputs and ``score`` is the Kendall tau
        between the network's and the surrogate's outputs.
    random_state : int, default=0
        Seeds the kGLM.

    Attributes
    ----------
    kernel_ : fitted kernel transformer
    estimator_ : fitted kernel machine
    classes_ : ndarray
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skattr import TorchModel
    >>> from skattr.estimators import TraceNTK
    >>> from skattr.surrogates import KernelSurrogate
    >>> X, y = load_digits(n_class=2, return_X_y=True)
    >>> X = (X / 16).astype("float32")
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    >>> model = TorchModel(net, epochs=3, random_state=0).fit(X[:200], y[:200])
    >>> sur = KernelSurrogate(TraceNTK(model), "svc").fit(X[:200])
    >>> tau = sur.score(X[200:300], y[200:300])
    >>> sur.explain(X[200:202]).shape
    (2, 200)
    """

    def __init__(self, kernel, estimator="kglm", *, random_state=0):
        self.kernel = kernel
        self.estimator = estimator
        self.random_state = random_state

    @property
    def model_(self):
        return self.kernel_.model_

    def _full(self):
        return isinstance(self.kernel_, EmpiricalNTK)

    def fit(self, X, y=None):
        """Fit the kernel on ``X`` and the kernel machine on ``K(X, X)``."""
        if isinstance(self.kernel, BaseAttributor):
            # an attributor (TRAK, TracIn, ...) through the symmetric kernel it defines
            self.kernel_ = AttributionKernel(clone(self.kernel))
        elif not hasattr(self.kernel, "transform") or not hasattr(self.kernel, "model"):
            raise TypeError("kernel must be a skattr kernel transformer such as TraceNTK(model).")
        else:
            self.kernel_ = clone(self.kernel)
        if isinstance(self.kernel_, EmpiricalNTK):
            self.kernel_.set_params(output="flat")
        K = self.kernel_.fit_transform(X, y)  # the fit set's gradients computed once
        model = self.kernel_.model_
        self.estimator_ = _make_estimator(self.estimator, self.random_state, K)
        classifier = is_classifier(self.estimator_)
        if model.task == "regression" and classifier:
            raise ValueError(
                f"The network is a regressor (task='regression') but the kernel machine "
                f"{type(self.estimator_).__name__} is a classifier; use estimator='krr' or 'svr'."
            )
        if model.task == "classification":
            self.classes_ = model.class_labels()
        if self._full() and classifier:
            raise ValueError(
                "EmpiricalNTK's (sample, class) kernel needs a regressor such as 'krr': it "
                "regresses the network's logits class by class."
            )
        if classifier:
            t = model.predict(X) if y is None else np.asarray(y)
            self.estimator_.fit(K, t)
            # the kernel machine's own classes (those of the targets it was fitted on)
            self.classes_ = self.estimator_.classes_
        else:
            if y is None:
                T = model.logits(X).cpu().numpy()
            elif model.task == "classification":
                yy = column_or_1d(y, warn=True)
                check_classification_targets(yy)
                if self._full():
                    model.encode_y(yy, K.shape[0] // model.n_outputs_)  # labels must be the network's
                else:
                    # a regressor on label indicators: the classes are those of y
                    self.classes_ = np.unique(yy)
                    if len(self.classes_) < 2:
                        raise ValueError(
                            f"y contains only one class ({self.classes_[0]}); a surrogate "
                            "needs at least two classes."
                        )
                    if len(yy) != K.shape[0]:
                        raise ValueError(
                            f"X and y have inconsistent numbers of samples: {K.shape[0]} and {len(yy)}."
                        )
                T = (yy[:, None] == self.classes_[None, :]).astype(np.float64)
                if T.shape[1] == 2 and (not self._full() or model.n_outputs_ == 1):
                    # binary: one output, +1 for classes_[1] and -1 for classes_[0], so that
                    # decision > 0 <=> classes_[1] (as sklearn's binary decision_function)
                    T = 2.0 * T[:, 1:] - 1.0
            else:
                T = np.asarray(y, dtype=np.float64).reshape(len(K) // (model.n_outputs_ if self._full() else 1), -1)
            if T.ndim == 2 and T.shape[1] == 1 and not self._full():
                T = T[:, 0]  # one output: 1-d targets (what SVR and friends expect)
            self.estimator_.fit(K, T.ravel() if self._full() else T)
        self.n_features_in_ = self.kernel_.n_features_in_
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # y defaults to the network's own outputs
        tags.target_tags.required = False
        return tags

    # ------------------------------------------------------------------ predictions
    def _outputs(self, X):
        """Raw surrogate outputs: decision values or regressed logits, (n, C) or (n,)."""
        K = self.kernel_.transform(X)
        est = self.estimator_
        if is_classifier(est):
            return None, K
        out = est.predict(K)
        if self._full():
            out = out.reshape(-1, self.model_.n_outputs_)
        return out, K

    def decision_function(self, X):
        """The kernel machine's decision values (classifiers) or regressed logits."""
        check_is_fitted(self)
        out, K = self._outputs(X)
        if out is not None:
            return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
        return self.estimator_.decision_function(K)

    def _check_classifier(self, what):
        if self.model_.task == "regression":
            raise AttributeError(f"{what} is not defined for a surrogate of a regression network.")

    def predict_proba(self, X):
        """Surrogate class probabilities (softmax of decision values when no predict_proba)."""
        check_is_fitted(self)
        self._check_classifier("predict_proba")
        return self._proba(*self._outputs(X))

    def _proba(self, out, K):
        if out is None:
            S = class_scores(self.estimator_, K)
            if np.ndim(S) == 1:
                p = 1 / (1 + np.exp(-S))
                return np.stack([1 - p, p], 1)
            return S
        out = np.asarray(out, dtype=np.float64)
        if out.ndim == 1 or out.shape[1] == 1:
            p = 1 / (1 + np.exp(-out.reshape(-1)))
            return np.stack([1 - p, p], 1)
        return softmax(out, axis=1)

    def predict(self, X):
        """Surrogate class predictions (the surrogate's outputs for a regression network)."""
        check_is_fitted(self)
        out, K = self._outputs(X)
        if out is None:
            return self.estimator_.predict(K)
        if self.model_.task == "regression":
            return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
        return self.classes_[self._proba(out, K).argmax(1)]  # the kernel is computed once

    def score(self, X, y=None):
        """Kendall-tau fidelity to the network on ``X`` (true class ``y``; binary: class 1).

        The surrogate's probabilities are matched to the network's by label (``classes_``
        against the network's ``class_labels()``), never by position: a class the surrogate never
        saw in fitting has probability 0 for it (with a ``UserWarning``), and a label of ``y``
        that the network does not have is a ``ValueError`` naming it.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,), default=None
            True labels (the network's labels); None takes the network's predicted class.

        Returns
        -------
        tau : float

        For a regression network: Kendall tau between the network's and the surrogate's outputs
        (all outputs flattened); ``y`` is not used.
        """
        check_is_fitted(self)
        if self.model_.task == "regression":
            S = np.asarray(self.predict(X), dtype=np.float64).ravel()
            P = np.asarray(self.model_.predict(X), dtype=np.float64).ravel()
            return float(kendalltau(P, S).statistic)
        S = self.predict_proba(X)  # first: validates X against the fitted kernel
        P = self.model_.predict_proba(X)
        # matched by label: the surrogate's classes_ may lack a class the network never
        # predicted on the fit set, or hold labels of a y the network does not know
        return fidelity_from_scores(P, S, self.model_.class_labels(), self.classes_, y)

    # ------------------------------------------------------------------ explanations
    def explain(self, X, target=None):
        """Per-training-example contributions ``w_j K(x, x_j)``, shape (n_samples, n_fit).

        ``target`` is the class (label) whose decision value is explained, default the surrogate's
        prediction for each sample.  Summed over ``j`` and added to the intercept, the
        contributions give the surrogate's decision value for that class (for binary
        classifiers with one decision value, the value for class 1).
        """
        check_is_fitted(self)
        est = self.estimator_
        K = self.kernel_.transform(X)
        if self._full():
            raise NotImplementedError("explain is defined for scalar kernels; use TraceNTK.")
        n = K.shape[0]
        if target is None:
            cls = self.predict(X)
        else:
            cls = np.broadcast_to(np.asarray(target), (n,))
        if hasattr(self, "classes_"):
            ci = label_positions(cls, self.classes_, whose="surrogate's")
        else:
            ci = np.zeros(n, int)
        if hasattr(est, "coef_") and np.ndim(est.coef_) == 2 and est.coef_.shape[1] == K.shape[1]:
            W = est.coef_  # (C or 1, n_fit): linear model on kernel features (kGLM)
        elif hasattr(est, "dual_coef_") and isinstance(est, KernelRidge):
            W = np.asarray(est.dual_coef_).reshape(K.shape[1], -1).T
        elif hasattr(est, "dual_coef_") and hasattr(est, "support_"):
            if est.dual_coef_.shape[0] != 1:
                raise NotImplementedError(
                    "explain for a multi-class SVC (one-vs-one) is not defined; use 'kglm' or 'krr'."
                )
            W = np.zeros((1, K.shape[1]))
            W[0, est.support_] = est.dual_coef_[0]
        else:
            raise NotImplementedError(f"explain needs a linear kernel machine, got {type(est).__name__}.")
        if W.shape[0] == 1:
            return K * W[0][None, :]
        return K * W[ci]
