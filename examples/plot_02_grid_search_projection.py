"""
Choosing ``projection_dim`` with ``GridSearchCV``
=================================================

The exact trace NTK is affordable for small networks; for large ones, kernels are computed from
randomly projected per-example gradients (``projection_dim`` rows). Larger projections are more
faithful and cost more. Because every skattr kernel is a scikit-learn estimator, the size can be
tuned like any hyper-parameter: here by cross-validated *fidelity* of a kernel-ridge surrogate to
the network.

A :class:`~skattr.cache.FeatureCache` makes the search cheap: projections are nested (the first
``k`` rows of a larger projection are the ``k``-row projection), so every sample is featurised
once, at the largest size, and every candidate and fold reads its prefix.
"""

# %%
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score

from skattr import TorchModel
from skattr.cache import FeatureCache
from skattr.estimators import TraceNTK
from skattr.surrogates import KernelSurrogate

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, y_train = X[:600], y[:600]
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
model = TorchModel(net, epochs=15, lr=0.05, random_state=0).fit(X_train, y_train)

# %%
# The search
# ----------
# ``KernelSurrogate`` is fitted *without* ``y``: each fold's surrogate imitates the network, and
# its ``score`` (used by the search) is the Kendall-tau fidelity to the network on the held-out
# fold. The kernel's parameters are reached through the usual ``kernel__`` prefix.
cache = FeatureCache()
surrogate = KernelSurrogate(TraceNTK(model, projection_dim=32, memory=cache), "krr")
dims = [16, 32, 64, 128, 256, 512]
search = GridSearchCV(surrogate, {"kernel__projection_dim": dims}, cv=3).fit(X_train)
print("best:", search.best_params_, f"tau = {search.best_score_:.3f}")

# %%
# The exact kernel is the ceiling that the projected ones approach.
exact = cross_val_score(KernelSurrogate(TraceNTK(model), "krr"), X_train, cv=3)
print(f"exact trace NTK: tau = {exact.mean():.3f}")

# %%
# Fidelity against projection size
# --------------------------------
mean = search.cv_results_["mean_test_score"]
std = search.cv_results_["std_test_score"]
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.errorbar(dims, mean, yerr=std, marker="o", capsize=3, label="projected trace NTK")
ax.axhline(exact.mean(), color="k", ls="--", lw=1, label="exact trace NTK")
ax.set_xscale("log", base=2)
ax.set_xlabel("projection_dim (rows of the random projection)")
ax.set_ylabel("Kendall tau fidelity (3-fold CV)")
ax.set_title("kernel-ridge surrogate of a 64-64-10 MLP on digits", fontsize=9)
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()
