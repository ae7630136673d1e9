"""SGLD draws per second: skattr's sampler vs devinterp's, same model, data and settings.

Both run in this one process, one chain after another, on the digits MLP 64-256-256-10
(85,002 parameters): SGLD on mini-batches of the 1,797 digits, the same step size, localisation
and nβ, no burn-in, one step between draws, and at every draw the per-example losses of a probe
set of 512 digits, which are then turned into their covariance (skattr streams it; for
devinterp the draws are stored by its callback and ``np.cov`` runs at the end, inside the timed
region).  Reported: draws per second and the ratio.

devinterp 2.0.x's per-chain loop is ``devinterp.slt.sampler.sample_single_chain`` (the loop its
``sample()`` calls once per chain) with its ``devinterp.optim.SGLD`` optimizer.  Install it with
``pip install --no-deps devinterp``.  Its top-level ``sample()`` needs ``datasets``, ``xarray``,
``zarr`` and ``transformers`` (not installed here: large, with compiled dependencies);
``sample_single_chain`` needs only ``pydantic`` plus one import from
``devinterp.slt.lm_loss``, which imports ``transformers.PreTrainedModel`` for an ``isinstance``
check on language models.  When ``transformers`` is missing this script registers a stub module
with a dummy ``PreTrainedModel`` class before importing devinterp; the sampling code that runs is
devinterp's own.  devinterp's loop takes batches as dicts with an ``"input_ids"`` key; we pass
the digits under that key and the labels under ``"labels"``.

The second part measures the memory of the streamed kernel for 10,000 points x 1,000 draws
(``--memory``): peak resident memory of ``LossKernel.fit`` against the ``n x n`` kernel itself
and against storing every draw's losses.

Run::

    python benchmarks/bench_loss_kernel.py                 # speed
    python benchmarks/bench_loss_kernel.py --part memory   # the 10,000 x 1,000 memory run
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import types
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp draws a progress bar per chain

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import add_common_args, load_digits_data, make_mlp, print_table, setup, train  # noqa: E402

from skattr.sampling import (  # noqa: E402
    LocalPosterior,
    SGLDSettings,
    StreamingMoments,
    chain_seeds,
    default_nbeta,
    sample,
)


def _import_devinterp():
    """devinterp's SGLD and per-chain loop, with a stub for ``transformers`` if it is missing."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    stubbed = False
    try:
        import transformers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers")

        class PreTrainedModel:  # only used by devinterp for isinstance() on language models
            pass

        stub.PreTrainedModel = PreTrainedModel
        sys.modules["transformers"] = stub
        stubbed = True
    import devinterp
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    version = getattr(devinterp, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("devinterp")
    return SGLD, sample_single_chain, version, stubbed


class _DictDataset(torch.utils.data.Dataset):
    """Digits as devinterp's loop wants them: dicts with ``input_ids`` (and ``labels``)."""

    def __init__(self, X, y, batched):
        self.X, self.y, self.batched = X, y, batched

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"input_ids": self.X[i], "labels": self.y[i]}

    def __getitems__(self, idx):  # batched fetch (used by DataLoader when present)
        if not self.batched:
            return [self[i] for i in idx]
        idx = torch.as_tensor(idx)
        return {"input_ids": self.X[idx], "labels": self.y[idx]}


def _collate_batched(batch):
    return batch


def run_devinterp(model, X, y, Xp, yp, *, n_chains, n_draws, eps, gamma, nbeta, batch_size,
                  batched):
    SGLD, sample_single_chain, _, _ = _import_devinterp()
    net = model.module_
    ds = _DictDataset(torch.as_tensor(X), torch.as_tensor(y), batched)
    Xp_t, yp_t = torch.as_tensor(Xp), torch.as_tensor(yp)
    draws = []

    def evaluate(m, data):
        z = m(data["input_ids"])
        return torch.nn.functional.cross_entropy(z, data["labels"], reduction="none"), {}

    def on_draw(loss, draw, chain, model, optimizer):
        with torch.no_grad():
            draws.append(torch.nn.functional.cross_entropy(model(Xp_t), yp_t,
                                                           reduction="none").double().numpy())

    import devinterp.slt.sampler as S

    orig_loader = S.DataLoader
    if batched:
        # same DataLoader, with a collate that keeps the already-batched dict
        S.DataLoader = lambda *a, **k: orig_loader(*a, collate_fn=_collate_batched, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c in range(n_chains):
                sample_single_chain(
                    net, ds, evaluate, {n: None for n, _ in net.named_parameters()},
                    num_draws=n_draws, num_burnin_steps=0, num_steps_bw_draws=1,
                    sampling_method=SGLD,
                    sampling_method_kwargs=dict(lr=eps, localization=gamma, nbeta=nbeta),
                    chain=c, seed=c, batch_size=batch_size, callbacks=[on_draw],
                )
    finally:
        S.DataLoader = orig_loader
    L = np.stack(draws)
    return np.cov(L.T), L.shape[0]


def run_skattr(model, X, y, Xp, yp, *, n_chains, n_draws, eps, gamma, nbeta, batch_size):
    Xt = torch.as_tensor(X)
    post = LocalPosterior(model, Xt, model.encode_y(y, len(y)))
    s = SGLDSettings(step_size=eps, localization=gamma, nbeta=nbeta, n_draws=n_draws, burn_in=0,
                     thin=1, batch_size=batch_size)
    probe = (torch.as_tensor(Xp), model.encode_y(yp, len(yp)))
    res = sample(post, s, chain_seeds(0, n_chains), probes=[probe],
                 make_observer=lambda: StreamingMoments(len(Xp)), n_jobs=1)
    return res.observer.covariance(), res.n_draws_used


def speed(args):
    X, y = load_digits_data()
    model, acc = train(make_mlp(0), X, y, epochs=args.epochs)
    rng = np.random.RandomState(0)
    pi = rng.choice(len(X), 512 if not args.quick else 128, replace=False)
    Xp, yp = X[pi], y[pi]
    m = 256
    cfg = dict(n_chains=2, n_draws=args.draws if not args.quick else 20, eps=1e-4, gamma=100.0,
               nbeta=default_nbeta(m), batch_size=m)
    print(f"MLP 64-256-256-10, train acc {acc:.3f}; SGLD {cfg}; probe {len(Xp)} points")
    stubbed = False
    try:
        _, _, dv_version, stubbed = _import_devinterp()
    except Exception as e:  # pragma: no cover - environment dependent
        print(f"devinterp could not be imported: {type(e).__name__}: {e}")
        dv_version = None
    rows = []
    # same settings, same quantity: the two covariance estimates should agree (up to Monte Carlo)
    if dv_version is not None:
        big = {**cfg, "n_draws": 100 if not args.quick else 20}
        Ca, _ = run_skattr(model, X, y, Xp, yp, **big)
        Cb, _ = run_devinterp(model, X, y, Xp, yp, batched=False, **big)
        iu = np.triu_indices(len(Xp))
        print(f"agreement: Pearson r between skattr's and devinterp's loss covariances "
              f"({2 * big['n_draws']} draws each): {np.corrcoef(Ca[iu], Cb[iu])[0, 1]:.3f}; "
              f"mean variance {np.diag(Ca).mean():.3g} vs {np.diag(Cb).mean():.3g}")
    # warm-up (first-call costs) for each contender, then the repeats interleaved so that a
    # change of machine load hits every contender alike
    contenders = [("skattr", lambda: run_skattr(model, X, y, Xp, yp, **cfg))]
    if dv_version is not None:
        for batched in (False, True):
            name = (f"devinterp {dv_version} "
                    f"({'batched __getitems__' if batched else 'per-item dataset'})")
            contenders.append((name, lambda b=batched: run_devinterp(model, X, y, Xp, yp,
                                                                     batched=b, **cfg)))
    run_skattr(model, X, y, Xp, yp, **{**cfg, "n_draws": 5, "n_chains": 1})
    if dv_version is not None:
        run_devinterp(model, X, y, Xp, yp, batched=False,
                      **{**cfg, "n_draws": 5, "n_chains": 1})
    results = {}
    for _ in range(args.repeats):
        for name, fn in contenders:
            t = time.perf_counter()
            _, nd = fn()
            results.setdefault(name, []).append(nd / (time.perf_counter() - t))
    if stubbed:
        print("(transformers is not installed: a stub PreTrainedModel was registered so that "
              "devinterp.slt.sampler imports; see the module docstring)")
    base = float(np.median(results["skattr"]))
    for name, v in results.items():
        med = float(np.median(v))
        rows.append([name, med, base / med])
    print_table(rows, ["sampler", "draws / s (median)", "skattr speed-up (x)"],
                title=f"SGLD draws per second, one process, {torch.get_num_threads()} thread(s), "
                      f"median of {args.repeats}")


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(args):
    from skattr import TorchModel
    from skattr.estimators.loss_kernel import LossKernel

    n, draws = (10_000, 1_000) if not args.quick else (2_000, 100)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, 20)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    model = TorchModel(net, epochs=2, lr=0.1, random_state=0, device="cpu").fit(X, y)
    before = _rss_mb()
    t = time.perf_counter()
    lk = LossKernel(model, n_chains=2, n_draws=draws // 2, burn_in=10, thin=1, step_size=1e-4,
                    localization=100.0, keep=None, random_state=0).fit(X, y)
    secs = time.perf_counter() - t
    peak = _rss_mb()
    kernel_mb = lk.kernel_.nbytes / 2**20
    stored_mb = n * draws * 8 / 2**20
    print_table(
        [[f"{n:,} x {draws:,}", secs, peak - before, kernel_mb, stored_mb, kernel_mb + stored_mb]],
        ["points x draws", "fit s", "peak RSS growth MB (streaming)", "kernel_ MB (n^2 float64)",
         "stored losses MB (n x draws float64)", "storing: losses + kernel MB"],
        title="Memory of the streamed loss kernel (sequential chains, keep=None)")


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--draws", type=int, default=100, help="draws per chain for the speed run")
    p.add_argument("--part", choices=["speed", "memory"], default="speed",
                   help="speed (vs devinterp) or memory (10,000 x 1,000, run alone for a clean "
                        "peak-RSS reading)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1
    setup(args, f"loss kernel: {args.part}")
    (speed if args.part == "speed" else memory)(args)


if __name__ == "__main__":
    main()
