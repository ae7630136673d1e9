"""
TracIn and influence functions
==============================

Two classic answers to "which training examples made this prediction?":

* **TracIn** (Pruthi et al., 2020) sums, over checkpoints saved during training, the learning
  rate times the dot product of the test and training loss gradients: how much each training
  example's SGD steps lowered the test loss.
* **Influence functions** (Koh and Liang, 2017) ask how the test loss would change if a training
  example were up-weighted at the optimum: ``-grad l(x)^T H^-1 grad l(z)``, with ``H`` the
  Hessian of the training loss. skattr solves ``H^-1`` exactly for small networks and by
  conjugate gradients, LiSSA or EK-FAC for large ones.

Both rank the training set for each test point, and both score each training example against
itself (*self-influence*), which flags mislabelled examples.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

from skattr import TorchModel, TrajectoryRecorder
from skattr.datasets import flip_labels
from skattr.estimators import InfluenceFunction, TracIn
from skattr.metrics import mislabel_detection_auc

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float64")
X_train, X_test, y_test = X[:300], X[1500:1520], y[1500:1520]
# 10% of the training labels flipped to another class, so self-influence has something to find
y_train, flipped = flip_labels(y[:300], fraction=0.1, random_state=0)

net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
model = TorchModel(net, epochs=30, lr=0.1, batch_size=32, dtype="float64",
                   callbacks=[TrajectoryRecorder()], random_state=0).fit(X_train, y_train)
print(f"accuracy on 200 held-out digits: {model.score(X[1500:1700], y[1500:1700]):.2f}")

# %%
# Fitting both
# ------------
# ``TracIn`` reads the checkpoints that :class:`~skattr.TrajectoryRecorder` saved (one per
# epoch); ``InfluenceFunction`` works at the final weights, with a damping term that keeps the
# Hessian positive definite (it warns, naming the value that is
# needed, when the damping is too small for that).
tracin = TracIn(model).fit(X_train, y_train)
influence = InfluenceFunction(model, solver="exact", damping=0.1).fit(X_train, y_train)
print("checkpoints:", len(tracin.learning_rates_))

S_tracin = tracin.attribute(X_test, y_test)          # (20, 300), positive = helped
S_if = influence.attribute(X_test, y_test)
rho = np.mean([spearmanr(a, b)[0] for a, b in zip(S_tracin, S_if)])
print(f"mean Spearman correlation between the two, per test digit: {rho:.2f}")

# %%
# Proponents of one test digit
# ----------------------------
fig, axes = plt.subplots(2, 6, figsize=(7, 2.8))
for r, (name, S) in enumerate((("TracIn", S_tracin), ("influence", S_if))):
    axes[r, 0].imshow(X_test[0].reshape(8, 8), cmap="gray_r")
    axes[r, 0].set_title(f"test: {y_test[0]}", fontsize=8)
    axes[r, 0].set_ylabel(name)
    for j, idx in enumerate(np.argsort(-S[0])[:5], start=1):
        axes[r, j].imshow(X_train[idx].reshape(8, 8), cmap="gray_r")
        axes[r, j].set_title(f"{name}: {y_train[idx]}", fontsize=7)
for a in axes.ravel():
    a.set_xticks([])
    a.set_yticks([])
fig.suptitle("the five strongest proponents of a test digit (label shown)", fontsize=9)

# %%
# Finding the flipped labels
# --------------------------
# A mislabelled example is fitted mostly through itself, so its self-influence is large. The
# ROC AUC below is the probability that a flipped example scores higher than a clean one.
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for name, est in (("TracIn", tracin), ("influence function", influence)):
    si = est.self_influence()
    auc = mislabel_detection_auc(si, flipped)
    print(f"{name}: mislabel detection AUC = {auc:.2f}")
    order = np.argsort(-si)
    found = np.cumsum(flipped[order]) / flipped.sum()
    ax.plot(np.arange(1, len(si) + 1) / len(si), found, label=f"{name} (AUC {auc:.2f})")
ax.plot([0, 1], [0, 1], color="gray", ls=":", label="random order")
ax.set_xlabel("fraction of training set inspected (highest self-influence first)")
ax.set_ylabel("fraction of flipped labels found")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
