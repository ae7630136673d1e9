"""
HYDRA: hypergradients through the training run
==============================================

HYDRA (Chen et al., 2021) follows the SGD run that trains the network and carries, for every
training example, the derivative of the final weights with respect to that example's loss
weight. A test point is scored by how much its loss would rise if the example were removed:
positive scores mean the example helped. Unlike influence functions it needs no convergence
assumption, and unlike TracIn it accounts for how later steps propagate an early step's effect
(momentum and weight decay included).

``HYDRA.fit`` trains a clone of the model itself, so that it can follow every step; the
hypergradients are projected to ``projection_dim`` rows as they are carried.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

from skattr import TorchModel
from skattr.datasets import flip_labels
from skattr.estimators import HYDRA
from skattr.metrics import mislabel_detection_auc

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, X_test, y_test = X[:400], X[400:700], y[400:700]
y_train, flipped = flip_labels(y[:400], fraction=0.1, random_state=0)

net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
model = TorchModel(net, epochs=4, batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4,
                   lr_schedule="cosine", random_state=0)

hydra = HYDRA(model, projection_dim=512).fit(X_train, y_train)
print(f"accuracy of the network HYDRA trained: {hydra.model_.score(X_test, y_test):.3f}")

# %%
# Attributions
# ------------
# ``attribute(X, y)`` has one row per test point and one column per training example.
scores = hydra.attribute(X_test[:20], y_test[:20])
top5 = np.argsort(-scores, axis=1)[:, :5]
print("scores:", scores.shape)
print("same-label share of the top-5 proponents:",
      round(float((y_train[top5] == y_test[:20, None]).mean()), 2))

# %%
# Self-influence flags the flipped labels
# ---------------------------------------
si = hydra.self_influence()
print(f"mislabel detection AUC: {mislabel_detection_auc(si, flipped):.2f}")

fig, ax = plt.subplots(figsize=(5.5, 3.5))
bins = np.linspace(si.min(), si.max(), 30)
ax.hist(si[~flipped], bins=bins, alpha=0.7, label="clean label")
ax.hist(si[flipped], bins=bins, alpha=0.7, label="flipped label")
ax.set_xlabel("HYDRA self-influence")
ax.set_ylabel("training examples")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
