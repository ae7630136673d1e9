"""
TRAK on your own model, and how many models it needs
====================================================

TRAK scores every training example for a test prediction from projected per-example gradients of
one or more trained models. With a single model that fits its training set, most examples'
reweighting terms ``1 - p`` are near zero and the attributions are noisy; an ensemble of models,
each trained on a random half of the training set, averages that noise away. This example
measures, for 1, 2 and 4 models, two things:

* the share of each test digit's top-5 proponents (highest scores) that carry the same label;
* the linear datamodeling score (LDS): the Spearman correlation between the scores summed over
  random training subsets and the model's output when retrained on each subset.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

from skattr import TorchModel
from skattr.estimators import TRAK
from skattr.metrics import SubsetRetrainer

X, y = load_digits(return_X_y=True)
X = (X / 16).astype("float32")
X_train, y_train, X_test, y_test = X[:400], y[:400], X[1500:1560], y[1500:1560]
net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                          torch.nn.Linear(32, 10))
template = TorchModel(net, epochs=10, lr=0.1, batch_size=64, random_state=0)

# %%
# An ensemble of four, reused for fewer
# -------------------------------------
# ``TRAK(template, n_models=4)`` trains four clones of the template on random halves of the
# training set. Passing the trained members back through ``models=`` with a smaller
# ``n_models`` reuses the first ones, so the comparison trains four networks, not seven.
trak4 = TRAK(template, n_models=4, projection_dim=512).fit(X_train, y_train)
members = trak4.models_

# %%
# The LDS ground truth: 12 models retrained on random halves, their outputs on the test set
# cached once and reused for every method scored against them.
retrainer = SubsetRetrainer(template, n_subsets=12, random_state=0).fit(X_train, y_train)

rows = []
for n in (1, 2, 4):
    trak = TRAK(template, models=members, n_models=n, projection_dim=512)
    scores = trak.fit(X_train, y_train).attribute(X_test, y_test)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    share = (y_train[top5] == y_test[:, None]).mean()
    lds = retrainer.score(trak, X_test, y_test)
    rows.append((n, share, lds))
    print(f"TRAK with {n} model(s): top-5 same-label share {share:.2f}, LDS {lds:.3f}")

# %%
# The figure
# ----------
ns, shares, ldss = (np.array(c) for c in zip(*rows))
fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.5, 3.2))
a1.plot(ns, shares, "o-")
a1.axhline(0.1, color="gray", ls=":", lw=1, label="chance (10 classes)")
a1.set_xlabel("number of models")
a1.set_ylabel("same-label share of top-5 proponents")
a1.set_ylim(0, 1)
a1.legend(loc="lower right", fontsize=8)
a2.plot(ns, ldss, "o-", color="C1")
a2.set_xlabel("number of models")
a2.set_ylabel("LDS (Spearman)")
for a in (a1, a2):
    a.set_xticks(ns)
fig.suptitle("TRAK on a 64-32-10 MLP, 400 training digits", fontsize=9)
fig.tight_layout()

# %%
# The training digits that TRAK-4 ranks highest for the first four test digits:
from skattr.plotting import plot_top_k_images  # noqa: E402

scores = trak4.attribute(X_test[:4], y_test[:4])
top = np.argsort(-scores, axis=1)[:, :6]
fig = plot_top_k_images(X_test[:4], X_train, top, image_shape=(8, 8), y_test=y_test[:4],
                        y_train=y_train)
plt.show()
