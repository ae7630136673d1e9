"""
Representation tracing: which training steps built a layer's representation?
=============================================================================

Pfahler and Morik (2021) observe that, trained with plain SGD, every Linear layer's weights are
exactly the initial weights plus one update per (step, example) pair. Applied to a test input,
those updates split the layer's output (minus what the initial weights give) into one
contribution per training example and step. :class:`~skattr.estimators.RepresentationTracer`
records the factors of every update while it trains a clone of the model, then scores each
training example by how much its contributions point along the test representation.
"""

# %%
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

from skattr import TorchModel
from skattr.estimators import RepresentationTracer
from skattr.plotting import plot_class_ridge, plot_influence_over_time

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, y_train, X_test, y_test = X[:600], y[:600], X[1000:1010], y[1000:1010]
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
model = TorchModel(net, epochs=5, lr=0.1, momentum=0.0, batch_size=32, random_state=0)

tracer = RepresentationTracer(model).fit(X_train, y_train)
print("traced layers:", tracer.layers_)
print("weight residual per layer:", {k: f"{v:.1e}" for k, v in tracer.weight_residual_.items()})

# %%
# The residuals say that the recorded updates reproduce the trained weights to float32
# precision. For each test digit, the influences of all training examples on one layer add up
# to the norm of what training changed in that layer's output.
S = tracer.attribute(X_test, layer="2")             # the output layer only
print("output-layer influences:", S.shape, "row sums > 0:", bool((S.sum(1) > 0).all()))
top = tracer.top_k(X_test, k=10)
print("same-label share of the top-10 proponents (layers summed):",
      round(float((y_train[top.proponents] == y_test[:, None]).mean()), 2))

# %%
# Influence over training time
# ----------------------------
# ``influence_over_time`` sums each step's contributions: the cumulative curves end at the
# norm of the change of each layer's representation of the test digit.
steps, over_time = tracer.influence_over_time(X_test[:1])
title = f"test digit {y_test[0]}: cumulative influence per layer"
ax = plot_influence_over_time(steps, over_time, sample=0, title=title)
ax.set_xlabel("training step")
ax.set_ylabel("cumulative influence")

# %%
# Which classes built the representation
# --------------------------------------
# For the output layer, the contributions of each class's training examples: the cosine of each
# contribution with the test representation (x axis), weighted by its size. The class that
# built the representation shows as a tall curve near cosine 1.
stats = tracer.class_statistics(X_test[:1])
predicted = tracer.model_.predict(X_test[:1])[0]
title = f"output layer, test digit {y_test[0]} (predicted {predicted})"
ax = plot_class_ridge(stats["2"], 0, predicted=predicted, title=title)
plt.show()
