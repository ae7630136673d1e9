"""
Concept attribution: which training digits teach "a closed loop"?
=================================================================

A *concept* is a binary property of the inputs, here "the digit has a closed loop" (0, 6, 8, 9).
:class:`~skattr.estimators.ConceptProbe` fits a sparse logistic-regression probe for the concept
on each layer's activations and reports where the network represents it. The probe's margin,
composed with the network up to that layer, is then a model output like any other: TRAK
attributes it to the training examples, and the examples that TRAK ranks highest can be removed
to check, by retraining, that the probe gets worse.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

from skattr import TorchModel
from skattr.estimators import TRAK, ConceptProbe, remove_and_retrain

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, y_train = X[:400], y[:400]
concept = np.isin(y_train, [0, 6, 8, 9]).astype(int)

net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
template = TorchModel(net, epochs=10, lr=0.1, batch_size=64, random_state=0)
model = TorchModel(net, epochs=10, lr=0.1, batch_size=64, random_state=0).fit(X_train, y_train)

# %%
# Probing every layer
# -------------------
# ``summary()`` lists, per layer, the probe's held-out accuracy and the share of zero weights
# (L1 penalty); ``best_layer_`` is the most accurate one.
probe = ConceptProbe(model, C=0.1, penalty="l1").fit(X_train, concept)
for row in probe.summary():
    print(f"layer {row['layer']}: held-out accuracy {row['accuracy']:.3f}, "
          f"{row['n_active']} of {row['n_dims']} features used")
print("best layer:", probe.best_layer_)

# %%
# TRAK on the concept
# -------------------
# ``output_function()`` freezes the best layer's probe into a TRAK output; the targets are the
# concept labels. Averaging the scores over concept-positive training digits gives one score per
# training example: how much it supports the concept.
ctrak = TRAK(model, output=probe.output_function(), projection_dim=512).fit(X_train, concept)
positives = X_train[concept == 1][:50]
c_scores = ctrak.attribute(positives, np.ones(len(positives), dtype=int)).mean(0)
order = np.argsort(-c_scores)
print("closed-loop share of the top 10%:", concept[order[:40]].mean(),
      "(base rate", round(concept.mean(), 2), ")")

fig, axes = plt.subplots(2, 8, figsize=(7.5, 2.4))
for j, idx in enumerate(order[:8]):
    axes[0, j].imshow(X_train[idx].reshape(8, 8), cmap="gray_r")
    axes[0, j].set_title(f"{y_train[idx]}", fontsize=8)
for j, idx in enumerate(order[::-1][:8]):
    axes[1, j].imshow(X_train[idx].reshape(8, 8), cmap="gray_r")
    axes[1, j].set_title(f"{y_train[idx]}", fontsize=8)
for a in axes.ravel():
    a.set_axis_off()
axes[0, 0].text(-12, 4, "most\nsupport", fontsize=8, va="center")
axes[1, 0].text(-12, 4, "least\nsupport", fontsize=8, va="center")
fig.suptitle("training digits by TRAK score for the closed-loop concept probe", fontsize=9)

# %%
# Remove and retrain
# ------------------
# Drop the top 10% of training digits by concept score (and, as a control, 10% at random),
# retrain, and probe again. A faithful attribution makes the concept harder to read off.
res = remove_and_retrain(template, X_train, y_train, concept, c_scores, fractions=(0.1,),
                         n_seeds=1, probe=ConceptProbe(template, C=0.1))
for row in res["summary"]:
    print(f"{row['condition']:8s} layer {row['layer']}: "
          f"probe accuracy {row['accuracy_mean']:.3f}")
plt.show()
