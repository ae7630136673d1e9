"""TRAK speed and memory: skattr vs the ``traker`` package (MadryLab TRAK) on CPU, one process.

1. Featurise + score, same model (MLP 64-256-256-10, 85,002 parameters, and a small CNN),
   same digits data (1,500 training, 297 test), same projection_dim, one model: wall time of traker's full pipeline (``load_checkpoint`` ->
   ``featurize`` -> ``finalize_features`` -> ``score`` -> ``finalize_scores``) against skattr's
   ``TRAK(model, projection_dim=k).fit(X_train, y_train).attribute(X_test, y_test)``, printed as a
   ratio.  traker runs in two CPU configurations: its default ``BasicProjector`` (Gaussian,
   ``block_size=100``: the random matrix is regenerated block by block for every batch), and the
   fastest one it allows on CPU (``block_size=k``: the dense ``p x k`` matrix is drawn once, outside
   the timed region).
2. Peak memory of ``TRAK(store=..., projection_dim=4096)`` fitting and scoring ``n_train =
   100,000`` synthetic examples: features (1.6 GB) live in the on-disk store and every step is
   blockwise; measured in a child process (``ru_maxrss``, and ``tracemalloc`` for numpy).

Usage::

    python benchmarks/bench_trak.py                    # both parts (about 10 min)
    python benchmarks/bench_trak.py --quick            # smoke run
    python benchmarks/bench_trak.py --part speed       # or --part memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    load_digits_data,
    make_cnn,
    make_mlp,
    n_params,
    print_table,
    setup,
    train,
)

from skattr import TorchModel  # noqa: E402
from skattr.estimators.trak import TRAK  # noqa: E402


def traker_ensemble(modules, Xtr, ytr, Xte, yte, proj_dim, *, ensembles=None, block_size=None,
                    proj_type="normal", seed=0, ridge=None, batch_size=256, save_dir=None):
    """traker's full pipeline on CPU for an ensemble of trained ``nn.Module`` classifiers.

    Every module is featurised (``load_checkpoint`` with its own ``model_id``, ``featurize``),
    features are finalised, every module scores the targets, and ``finalize_scores`` combines the
    first ``M`` model ids for each ``M`` in ``ensembles`` (default: all).  ``block_size=None``
    means ``proj_dim`` (the dense Gaussian matrix is drawn once per model id instead of block by
    block for every batch: traker's fastest CPU setting).  ``ridge``: None keeps traker's
    ``lambda_reg=0``; a float sets ``lambda_reg = ridge * mean |phi_i|^2`` (skattr's relative
    ridge, averaged over models) before the features are finalised.  A list of such values
    re-finalises the same features once per value.

    Returns ``({M: scores (n_test, n_train)}, seconds)`` (for a list of ridges, a list of such
    dicts); the time covers featurising, finalising and scoring with the first ridge (TRAKer /
    projector construction excluded).

    Works around two traker CPU quirks (see ``_peers.py``): ``device`` must be the string "cpu";
    with ``block_size >= proj_dim``, ``finalize_features`` frees the projection matrix and scoring
    the same model id again crashes, so the projector is told to regenerate it.
    """
    import copy
    import logging

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    Xtr_t = torch.as_tensor(np.ascontiguousarray(Xtr, dtype=np.float32))
    ytr_t = torch.as_tensor(np.asarray(ytr, dtype=np.int64))
    Xte_t = torch.as_tensor(np.ascontiguousarray(Xte, dtype=np.float32))
    yte_t = torch.as_tensor(np.asarray(yte, dtype=np.int64))
    M = len(modules)
    ensembles = [M] if ensembles is None else list(ensembles)
    ridges = list(ridge) if isinstance(ridge, (list, tuple)) else [ridge]
    base = copy.deepcopy(modules[0]).cpu().float().eval()
    grad_dim = sum(p.numel() for p in base.parameters())
    projector = BasicProjector(
        grad_dim=grad_dim, proj_dim=int(proj_dim), seed=int(seed),
        proj_type=ProjectionType(proj_type), device="cpu",
        block_size=int(proj_dim if block_size is None else block_size), dtype=torch.float32,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="traker_") if save_dir is None else _nullctx(save_dir) as d:
        traker = TRAKer(model=base, task="image_classification", train_set_size=len(Xtr_t),
                        save_dir=d, load_from_save_dir=True, device="cpu", projector=projector,
                        use_half_precision=False, logging_level=logging.ERROR)
        ckpts = [{k: v.detach().cpu().float().clone() for k, v in m.state_dict().items()} for m in modules]
        ids = list(range(M))
        t0 = time.perf_counter()
        sq = []
        for j, ck in enumerate(ckpts):
            traker.load_checkpoint(ck, model_id=j)
            for i in range(0, len(Xtr_t), batch_size):
                xb, yb = Xtr_t[i:i + batch_size], ytr_t[i:i + batch_size]
                traker.featurize(batch=(xb, yb), num_samples=len(xb))
            g = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
            sq.append(float((g**2).sum(1).mean()))
        seconds = None
        for r_i, r in enumerate(ridges):
            traker.score_computer.lambda_reg = 0.0 if r is None else float(r) * float(np.mean(sq))
            if r_i > 0:  # re-finalise the same features with another lambda_reg
                for j in ids:
                    traker.saver.model_ids[j]["is_finalized"] = 0
            traker.finalize_features(model_ids=ids)
            if r_i == 0:
                for j, ck in enumerate(ckpts):
                    projector.model_id = -1  # regenerate the (freed) matrix for this model id
                    traker.start_scoring_checkpoint(exp_name="bench", checkpoint=ck, model_id=j,
                                                    num_targets=len(Xte_t))
                    for i in range(0, len(Xte_t), batch_size):
                        xb, yb = Xte_t[i:i + batch_size], yte_t[i:i + batch_size]
                        traker.score(batch=(xb, yb), num_samples=len(xb))
            out = {}
            for m in ensembles:
                s = traker.finalize_scores(exp_name="bench", model_ids=list(range(m)))
                out[m] = np.array(s, dtype=np.float64, copy=True).T
            if seconds is None:
                seconds = time.perf_counter() - t0
            results.append(out)
        del traker
    return (results if isinstance(ridge, (list, tuple)) else results[0]), seconds


class _nullctx:
    def __init__(self, v):
        self.v = v

    def __enter__(self):
        return self.v

    def __exit__(self, *a):
        return False


def traker_scores(module, Xtr, ytr, Xte, yte, proj_dim, block_size=None, proj_type="normal"):
    """traker's pipeline for one model: ``(scores (n_test, n_train), seconds)``."""
    out, sec = traker_ensemble([module], Xtr, ytr, Xte, yte, proj_dim, block_size=block_size,
                               proj_type=proj_type)
    return out[1], sec


def skattr_scores(model, Xtr, ytr, Xte, yte, k, projection):
    trak = TRAK(model, projection_dim=k, projection=projection, batch_size=256)
    return trak.fit(Xtr, ytr).attribute(Xte, yte)


def speed(args):
    X, y = load_digits_data()
    n_tr, n_te = (128, 32) if args.quick else (args.n_train, args.n_test)
    Xte, yte = X[-n_te:], y[-n_te:]
    if n_tr <= len(X) - n_te:
        Xtr, ytr = X[:n_tr], y[:n_tr]
    else:  # more training points than digits: jittered copies (pixel noise, seeded)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(X) - n_te, n_tr)
        Xtr = np.clip(X[idx] + rng.normal(0, 0.05, (n_tr, X.shape[1])), 0, 1).astype(np.float32)
        ytr = y[idx]
        print(f"n_train {n_tr} > digits available: jittered copies of the first "
              f"{len(X) - n_te} digits (Gaussian pixel noise, sd 0.05)")
    dims = [512] if args.quick else args.dims
    rows = []
    for arch in args.archs:
        net = make_mlp(0) if arch == "mlp" else make_cnn(0)
        model, acc = train(net, X[:1000], y[:1000], epochs=args.epochs)
        module = model.module_
        name = "MLP 64-256-256-10" if arch == "mlp" else "CNN (conv 1-16-32, linear 2048-10)"
        print(f"{name}: {n_params(module):,} parameters, trained on 1,000 digits (train acc "
              f"{acc:.3f}); n_train {n_tr}, n_test {n_te}")
        # untimed warm-ups (one-off start-up costs of both libraries)
        traker_scores(module, Xtr[:32], ytr[:32], Xte[:8], yte[:8], proj_dim=64, block_size=64)
        skattr_scores(model, Xtr[:32], ytr[:32], Xte[:8], yte[:8], 64, "factored")
        for k in dims:
            t_sk = {}
            for proj in args.kinds:
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    skattr_scores(model, Xtr, ytr, Xte, yte, k, proj)
                    ts.append(time.perf_counter() - t0)
                t_sk[proj] = float(np.median(ts))
            for cname, bs in (("default (block_size=100)", 100), (f"matrix once (block_size={k})", k)):
                if bs == 100 and k > 1024 and not args.slow_traker:
                    # traker's default CPU path is slow at this size: time it on a quarter of
                    # the data and scale (its cost is linear in the number of samples)
                    q = 4
                    _, t_tr = traker_scores(module, Xtr[: n_tr // q], ytr[: n_tr // q],
                                            Xte[: n_te // q], yte[: n_te // q], proj_dim=k, block_size=bs)
                    t_tr *= q
                    cname += " (1/4 of the data, x4)"
                else:
                    _, t_tr = traker_scores(module, Xtr, ytr, Xte, yte, proj_dim=k, block_size=bs)
                row = [arch.upper(), k, cname, t_tr]
                for proj in args.kinds:
                    row += [t_sk[proj], t_tr / t_sk[proj]]
                rows.append(row)
                print(" | ".join(str(v) for v in row), flush=True)
    heads = ["model", "k", "traker CPU config", "traker s"]
    for proj in args.kinds:
        heads += [f"skattr {proj} s", "ratio"]
    print_table(
        rows, heads,
        title=f"Featurise {n_tr} + score {n_te}, one model, CPU, {torch.get_num_threads()} thread(s) "
              "(ratio = traker time / skattr time)",
    )
    return rows


# ------------------------------------------------------------------------------------ memory
def _memory_child(n_train, k, block, outdir, n_test):
    import tracemalloc

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    tracemalloc.start()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_train, 32)).astype(np.float32)
    y = rng.integers(0, 10, n_train)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model = TorchModel(net, batch_size_eval=1024)  # a random network, used as is
    t0 = time.perf_counter()
    trak = TRAK(model, projection_dim=k, store=outdir, block_size=block, batch_size=1024).fit(X, y)
    t_fit = time.perf_counter() - t0
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Xt = rng.normal(size=(n_test, 32)).astype(np.float32)
    t0 = time.perf_counter()
    S = trak.attribute(Xt, rng.integers(0, 10, n_test))
    t_score = time.perf_counter() - t0
    si = trak.self_influence()
    _, peak_py = tracemalloc.get_traced_memory()
    out = {
        "n_train": n_train, "k": k, "block_size": block, "n_test": n_test,
        "solver": trak.solver_, "store_bytes": trak.store_.nbytes(),
        "in_memory_features_bytes": n_train * k * 4,
        "fit_s": t_fit, "score_s": t_score, "scores_shape": list(S.shape),
        "finite": bool(np.isfinite(S).all() and np.isfinite(si).all()),
        "peak_rss_fit": rss_fit,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tracemalloc_peak": peak_py,
    }
    print(json.dumps(out))


def memory(args):
    n, k = (20_000, 1024) if args.quick else (args.mem_n_train, args.mem_k)
    with tempfile.TemporaryDirectory(prefix="skattr_store_") as d:
        env = dict(os.environ, BENCH_THREADS=str(args.threads or torch.get_num_threads()))
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), str(k),
               str(args.mem_block), d, "100"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(res.stdout, res.stderr)
            raise RuntimeError("memory benchmark child failed")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        wall = time.perf_counter() - t0
    gib = 2**30
    rows = [[
        out["n_train"], out["k"], out["block_size"], out["store_bytes"] / gib,
        out["in_memory_features_bytes"] / gib, out["peak_rss"] / gib, out["peak_rss_fit"] / gib,
        out["tracemalloc_peak"] / gib, out["fit_s"], out["score_s"],
    ]]
    print_table(
        rows,
        ["n_train", "k", "block", "store GiB", "features in RAM would be GiB", "peak RSS GiB",
         "peak RSS after fit GiB", "tracemalloc peak GiB", "fit s", "score 100 s"],
        title="Out-of-core TRAK: peak memory of fit + scoring (child process, whole process RSS)",
    )
    ok = out["peak_rss"] < 2 * gib and out["finite"]
    print(f"peak RSS {out['peak_rss'] / gib:.2f} GiB {'<' if ok else '>='} 2 GiB "
          f"(solver {out['solver']}, wall {wall:.0f} s incl. start-up)")
    return out


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        a = sys.argv[2:]
        return _memory_child(int(a[0]), int(a[1]), int(a[2]), a[3], int(a[4]))
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--part", choices=["speed", "memory", "all"], default="all")
    p.add_argument("--n-train", type=int, default=1500,
                   help="training points (above 1,500: jittered copies of the digits)")
    p.add_argument("--n-test", type=int, default=297)
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--kinds", nargs="+", default=["factored", "kronecker"],
                   help="skattr projection kinds to time")
    p.add_argument("--slow-traker", action="store_true",
                   help="time traker's default config on all the data even when it is slow")
    p.add_argument("--mem-n-train", type=int, default=100_000)
    p.add_argument("--mem-k", type=int, default=4096)
    p.add_argument("--mem-block", type=int, default=4096)
    args = p.parse_args(argv)
    setup(args, "TRAK: skattr vs traker (CPU)")
    if args.part in ("speed", "all"):
        speed(args)
    if args.part in ("memory", "all"):
        memory(args)
    if torch.cuda.is_available():
        print("\n(CUDA is available: rerun on the GPU with traker's CUDA projector for a GPU table.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
