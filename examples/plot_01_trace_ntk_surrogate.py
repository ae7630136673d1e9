"""
A trace-NTK surrogate of your own network
=========================================

Train a small network, compute its trace neural tangent kernel (trace NTK) between test and
training points, and fit a kernel machine on that kernel to the *network's own* outputs. The
surrogate's Kendall-tau fidelity says how closely the kernel machine ranks the classes the way
the network does; its ``explain`` method splits each prediction into one contribution per
training example.
"""

# %%
# Train a network
# ---------------
# Any ``nn.Module`` that outputs logits works; :class:`~skattr.TorchModel` trains it (or wraps
# one you trained yourself) and is an ordinary scikit-learn classifier.
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skattr import TorchModel
from skattr.estimators import TraceNTK
from skattr.plotting import plot_kernel_heatmap
from skattr.surrogates import KernelSurrogate

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=600, test_size=300,
                                                    random_state=0)

net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
model = TorchModel(net, epochs=15, lr=0.05, random_state=0).fit(X_train, y_train)
print(f"network test accuracy: {model.score(X_test, y_test):.3f}")

# %%
# The trace NTK
# -------------
# ``TraceNTK(model).fit(X_train)`` stores the reference set; ``transform(X)`` returns the
# kernel between ``X`` and it, shape ``(n_samples, n_train)``, cosine-normalised by default.
# On the training set against itself the kernel shows one block per class.
ntk = TraceNTK(model).fit(X_train)
K_test = ntk.transform(X_test)
print("K(test, train):", K_test.shape)

K_train = ntk.transform(X_train[:200])[:, :200]
ax = plot_kernel_heatmap(K_train, y_train[:200], title="trace NTK, 200 training digits")
ax.set_xlabel("training digit (sorted by class)")
ax.set_ylabel("training digit (sorted by class)")

# %%
# Surrogates and their fidelity
# -----------------------------
# ``KernelSurrogate`` fitted without ``y`` imitates the network: its targets are the network's
# predicted labels (``"kglm"``, a kernel GLM, and ``"svc"``, a support-vector classifier) or logits (``"krr"``, kernel ridge regression). ``score`` is the Kendall tau
# between the network's class probabilities and the surrogate's scores, averaged over test
# points (1 means the same class ranking everywhere).
taus = {}
for estimator in ("kglm", "svc", "krr"):
    surrogate = KernelSurrogate(TraceNTK(model), estimator).fit(X_train)
    taus[estimator] = surrogate.score(X_test)
    print(f"{estimator:5s} fidelity tau = {taus[estimator]:.3f}")

# %%
# The classifiers are fitted to the predicted label alone, so how they order the *other*
# classes is only loosely tied to the network; kernel ridge regression is fitted to all ten
# logits and reproduces the network's full ranking much more closely.

# %%
# Explaining one prediction
# -------------------------
# ``explain(X)`` returns, for the predicted class, each training example's term
# ``w_j K(x, x_j)`` of the surrogate's decision value. The training digits with the largest
# terms are the ones the surrogate leans on most for that test digit.
surrogate = KernelSurrogate(TraceNTK(model), "krr").fit(X_train)
contrib = surrogate.explain(X_test[:3])
print("contributions:", contrib.shape)

fig, axes = plt.subplots(3, 6, figsize=(7, 3.8))
for row in range(3):
    top = np.argsort(-contrib[row])[:5]
    axes[row, 0].imshow(X_test[row].reshape(8, 8), cmap="gray_r")
    axes[row, 0].set_title(f"test: {y_test[row]}", fontsize=8)
    for j, idx in enumerate(top, start=1):
        axes[row, j].imshow(X_train[idx].reshape(8, 8), cmap="gray_r")
        axes[row, j].set_title(f"{y_train[idx]} ({contrib[row, idx]:.2f})", fontsize=7)
for a in axes.ravel():
    a.set_axis_off()
fig.suptitle("each test digit (left) and the five training digits that contribute most", fontsize=9)
fig.tight_layout()
plt.show()
