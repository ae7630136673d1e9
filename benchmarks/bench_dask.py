"""Parallel featurisation and out-of-core TRAK scoring (issue 14).

Three measurements, each in one process tree, printed as ratios:

1. ``--part throughput``: TRAK featurisation of jittered digits into an on-disk store with
   ``n_jobs=1`` (this process) and ``n_jobs=2`` (joblib's loky processes), rows per second and
   their ratio; workers are started (and have imported torch) before the clock starts, and
   their start-up is printed separately.
2. ``--part dask``: the same featurisation with two joblib loky workers and with a
   ``dask.distributed.LocalCluster`` of two worker processes (``parallel_config(backend="dask")``):
   Dask's overhead at equal workers.
3. ``--part scale``: TRAK on ``--n-train`` (10^6) jittered digits rows featurised into the store,
   then ``attribute(X_test, out=folder)`` for ``--n-test`` (1,000) targets written blockwise to a
   score store, and ``top_k`` streamed through the blocks; the peak resident memory of the
   process (``resource.getrusage``) and the times.  The training features are real (projected
   gradients of a digits MLP), not synthetic.
4. ``--part memory``: the peak resident memory that the parallel featurisation into an
   in-memory store (``TRAK(store=None, n_jobs=2)``'s path, :func:`skattr.parallel.featurize_blocks`)
   adds to this process, against the size of the features: the peak is reset
   (``/proc/self/clear_refs``) after warm-up and read from ``VmHWM``.  Run it with
   ``PYTHONPATH`` pointing at an older checkout to compare versions.
5. ``--part influence``: ``InfluenceFunction(solver="cg")`` scoring ``--n-test`` targets with
   ``n_jobs=1`` and ``n_jobs=2`` (loky, workers warmed up first): one solve per gradient batch of
   ``--batch`` targets; the time ratio and whether the scores are identical.

    python benchmarks/bench_dask.py --part throughput
    python benchmarks/bench_dask.py --part dask
    python benchmarks/bench_dask.py --part scale --n-train 1000000 --n-test 1000
    python benchmarks/bench_dask.py --part memory --n 200000 --k 256 --block 4096
    python benchmarks/bench_dask.py --part influence --n 300 --n-test 64 --batch 16

torch runs one thread per process (``torch.set_num_threads(1)``): the machine has two cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.datasets import load_digits

from skattr import TorchModel
from skattr.estimators import TRAK

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import proc_status  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="TRAK attributes one model")  # measured, not advice


def digits(n, seed=0):
    """``n`` rows of digits with Gaussian jitter (0.05 of the pixel range), float32."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), n)
    return (X[idx] + rng.normal(0, 0.05, (n, 64)).astype("float32")), y[idx]


def model(seed=0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return TorchModel(net, epochs=5, lr=0.1, random_state=seed).fit(X, y)


def _warm(n_jobs):
    """Start joblib's workers (and import skattr in them) before timing."""
    t = time.perf_counter()
    joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(_import)() for _ in range(2 * n_jobs))
    return time.perf_counter() - t


def _import():
    import skattr.estimators  # noqa: F401

    return 0


def featurise(m, X, y, k, block, n_jobs, root):
    d = Path(tempfile.mkdtemp(dir=root))
    t = time.perf_counter()
    trak = TRAK(m, projection_dim=k, store=d, block_size=block, n_jobs=n_jobs).fit(X, y)
    dt = time.perf_counter() - t
    F = np.concatenate([np.asarray(F) for _, _, F, _ in trak.store_.iter_blocks(0)])
    shutil.rmtree(d)
    return dt, F


def part_throughput(a):
    m, (X, y) = model(), digits(a.n, 1)
    start = _warm(2)
    t1, F1 = featurise(m, X, y, a.k, a.block, 1, a.root)
    t2, F2 = featurise(m, X, y, a.k, a.block, 2, a.root)
    print(f"featurisation of {a.n} rows, k={a.k}, blocks of {a.block} (loky workers started in "
          f"{start:.1f} s, not timed)")
    print(f"  n_jobs=1: {t1:.2f} s  {a.n / t1:,.0f} rows/s")
    print(f"  n_jobs=2: {t2:.2f} s  {a.n / t2:,.0f} rows/s")
    print(f"  speed-up 2 vs 1 workers: {t1 / t2:.2f}x; features identical: {np.array_equal(F1, F2)}")


def part_dask(a):
    from dask.distributed import Client, LocalCluster

    m, (X, y) = model(), digits(a.n, 1)
    _warm(2)
    tl = [featurise(m, X, y, a.k, a.block, 2, a.root) for _ in range(2)]
    t = time.perf_counter()
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(_import)
        start = time.perf_counter() - t
        with joblib.parallel_config(backend="dask"):
            td = [featurise(m, X, y, a.k, a.block, None, a.root) for _ in range(2)]
    print(f"featurisation of {a.n} rows, k={a.k}, blocks of {a.block}, 2 workers each "
          f"(Dask LocalCluster started in {start:.1f} s, not timed); first and second run")
    for name, r in (("joblib loky", tl), ("Dask", td)):
        print(f"  {name:11s}: " + ", ".join(f"{dt:.2f} s ({a.n / dt:,.0f} rows/s)" for dt, _ in r))
    print(f"  Dask / loky time: first {td[0][0] / tl[0][0]:.2f}, second {td[1][0] / tl[1][0]:.2f}; "
          f"features identical: {np.array_equal(tl[0][1], td[0][1])}")


def part_scale(a):
    m = model()
    root = Path(tempfile.mkdtemp(dir=a.root))
    try:
        X, y = digits(a.n_train, 1)
        Xt, yt = digits(a.n_test, 2)
        t = time.perf_counter()
        trak = TRAK(m, projection_dim=a.k, store=root / "features", block_size=a.block,
                    n_jobs=a.n_jobs).fit(X, y)
        t_fit = time.perf_counter() - t
        rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        del X, y
        t = time.perf_counter()
        st = trak.attribute(Xt, yt, out=root / "scores")
        t_out = time.perf_counter() - t
        t = time.perf_counter()
        top = trak.top_k(Xt, yt, k=10)
        t_top = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        # check: the store's top-k equals the streamed one, and one block against a direct product
        same = np.array_equal(st.top_k(10).proponents, top.proponents)
        print(f"TRAK, {a.n_train:,} train x {a.n_test:,} test, k={a.k}, blocks of {a.block}, "
              f"n_jobs={a.n_jobs} (digits MLP 64-64-10, real projected gradients)")
        print(f"  fit (featurise into the store + Phi^T Phi): {t_fit:.1f} s "
              f"({trak.store_.nbytes() / 2**30:.2f} GiB of features on disk)")
        print(f"  attribute(out=...): {t_out:.1f} s, {st.nbytes() / 2**30:.2f} GiB of float64 "
              f"scores written in {st.n_blocks} blocks")
        print(f"  top_k(k=10) streamed: {t_top:.1f} s; equals the score store's top-k: {same}")
        print(f"  peak RSS of this process: {rss_fit:.2f} GiB after fit, {rss:.2f} GiB in all "
              f"(ru_maxrss; children not included)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def part_memory(a):
    import skattr
    from skattr.featurize import Featurizer, encode_targets
    from skattr.outputs import make_output
    from skattr.parallel import featurize_blocks
    from skattr.store import MemoryStore

    m, (X, y) = model(), digits(a.n, 1)
    out = make_output("margin")
    fz = Featurizer(m, out, projection_dim=a.k, projection="kronecker", seed=0)
    y_enc = encode_targets([m], out, X, y)

    def run(n):
        st = MemoryStore(n, a.k, 1, a.block, "float32")
        featurize_blocks(lambda j: fz, X[:n], [y_enc[0][:n]], st, st.missing(), dim=a.k,
                         n_jobs=2)
        return st

    _warm(2)
    run(4 * a.block)  # warm-up: workers import skattr, the projector is built
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = proc_status("VmRSS")
    st = run(a.n)
    peak = proc_status("VmHWM")
    feats = st.F[0].nbytes
    print(f"featurisation of {a.n:,} rows into memory, k={a.k}, blocks of {a.block}, n_jobs=2 "
          f"(loky), skattr from {Path(skattr.__file__).parent}")
    print(f"  features {feats / 2**20:,.0f} MiB; peak growth of this process "
          f"{(peak - base) / 2**20:,.0f} MiB = {(peak - base) / feats:.2f}x the features")


def part_influence(a):
    from skattr.estimators.influence import InfluenceFunction

    m, (X, y) = model(), digits(a.n, 1)
    Xt, yt = digits(a.n_test, 2)
    kw = dict(solver="cg", damping=1.0, n_iter=30, tol=1e-6, batch_size=a.batch)
    _warm(2)
    # warm-up in the workers too (torch.func's first HVP in a process)
    InfluenceFunction(m, **kw, n_jobs=2).fit(X, y).attribute(Xt[: 2 * a.batch], yt[: 2 * a.batch])
    res = {}
    for n_jobs in (1, 2):
        inf = InfluenceFunction(m, **kw, n_jobs=n_jobs).fit(X, y)
        t = time.perf_counter()
        S = inf.attribute(Xt, yt)
        res[n_jobs] = (time.perf_counter() - t, S)
    (t1, S1), (t2, S2) = res[1], res[2]
    print(f"InfluenceFunction(cg, damping=1, n_iter=30) on {a.n} training rows, {a.n_test} "
          f"targets in batches of {a.batch} (MLP 64-64-10, {inf.n_params_:,} parameters)")
    print(f"  n_jobs=1: {t1:.2f} s; n_jobs=2 (loky): {t2:.2f} s; speed-up {t1 / t2:.2f}x; "
          f"scores identical: {np.array_equal(S1, S2)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["throughput", "dask", "scale", "memory", "influence"],
                   required=True)
    p.add_argument("--batch", type=int, default=16, help="targets per solve (influence)")
    p.add_argument("--n", type=int, default=20000, help="rows featurised (throughput, dask)")
    p.add_argument("--n-train", type=int, default=1_000_000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--k", type=int, default=256, help="projection_dim")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--n-jobs", type=int, default=1, help="workers of the scale part")
    p.add_argument("--root", default=None, help="folder for the stores (default: a temp dir)")
    args = p.parse_args()
    {"throughput": part_throughput, "dask": part_dask, "scale": part_scale,
     "memory": part_memory, "influence": part_influence}[args.part](args)
