"""A/B in one process of HYDRA's default full-vector path (``hessian="none"``,
``projection_dim=None``): the flush before e8bed8c (per-example gradients formed by
``source.project``: the dense matrix, reordered to parameter order, layers concatenated,
converted to float64, then ``index_add_``; finish with ``isfinite`` over all of ``D`` and the
self-influence from one ``(n, p)`` gradient matrix), re-created here by monkeypatching, against
the current code (outer products added into ``D``'s columns in reused row blocks).

    OMP_NUM_THREADS=1 python benchmarks/hydra_full_vectors_ab.py 2000 2

MLP 20-256-256-6 (72,710 parameters), ``make_classification`` data, ``TorchModel`` defaults;
runs alternate old / new; prints the seconds of each and whether the outputs are identical.
"""

import sys
import time

import numpy as np
import torch
from sklearn.datasets import make_classification

import skattr.hypergradients as hg
from skattr import TorchModel
from skattr.estimators import hydra as hy
from skattr.estimators.hydra import HYDRA
from skattr.gradients import KronRecord


def old_flat(self, n):
    recs = [KronRecord(key, xb[:n], db[:n], False) for key, xb, db in self._recs]
    self.D.index_add_(0, self._rows[:n], self.source.project(recs))


def old_finish(self, recursion, X, y, source):
    D = recursion.finish()
    if not bool(torch.isfinite(D).all()):
        raise FloatingPointError("diverged")
    self.hypergradients_ = D.cpu().numpy()
    self._source_ = source
    self.coefficients_ = hg.lean_coefficients(self.trajectory_.lrs_, self.trajectory_.momentum_,
                                              self.trajectory_.weight_decay_)
    self.lean_scores_ = None
    G = self._target_features(X[self.track_], y[self.track_])
    self.self_influence_ = -(G * D).sum(1).cpu().numpy()


def main(n=2000, repeats=2):
    X, y = make_classification(n_samples=n, n_features=20, n_informative=10, n_classes=6,
                               n_clusters_per_class=1, random_state=0)
    X = X.astype("float32")
    net = torch.nn.Sequential(torch.nn.Linear(20, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 6))
    model = TorchModel(net, random_state=0)
    TorchModel(**model.get_params()).fit(X[:100], y[:100])  # warm-up
    t = time.perf_counter()
    TorchModel(**model.get_params()).fit(X, y)
    tfit = time.perf_counter() - t
    impl = {"old": (old_flat, old_finish),
            "new": (hg.ClosedFormRecursion._flush_flat, hy.HYDRA._finish_vector)}
    times, out = {"old": [], "new": []}, {}
    for _ in range(repeats):
        for name, (flat, finish) in impl.items():
            hg.ClosedFormRecursion._flush_flat, hy.HYDRA._finish_vector = flat, finish
            t = time.perf_counter()
            h = HYDRA(model).fit(X, y)
            times[name].append(time.perf_counter() - t)
            out[name] = (h.hypergradients_, h.self_influence())
            del h
    print(f"n={n} plain fit {tfit:.2f}s; HYDRA() full vectors old "
          f"{['%.2f' % v for v in times['old']]} s, new {['%.2f' % v for v in times['new']]} s")
    print("hypergradients bit-identical:", np.array_equal(out["old"][0], out["new"][0]),
          "self_influence bit-identical:", np.array_equal(out["old"][1], out["new"][1]))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
