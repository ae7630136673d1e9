"""skattr on a real ``dask.distributed`` cluster through ``joblib.parallel_config(backend="dask")``.

One module-scoped ``LocalCluster`` of two worker processes (one thread each).  What runs on it
(TRAK featurisation into an on-disk store, the store's Gram matrix, blockwise scores and top-k,
ensemble members, LDS subset models, SGLD chains) is compared with the same computation in this
process.  Then a worker is killed in the middle of a featurisation, and another raises; a
worker dies reading a block for the Gram matrix and for the scores (Dask reruns the block), a
block kills its worker on every try (an error naming the block instead of joblib waiting
forever) or raises, and the rerun keeps the finished score blocks.  Calls that could hang run
in a thread with a deadline (:func:`_within`).

Skipped when dask.distributed is missing, except under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import stored_features

from skattr import TorchModel
from skattr.estimators import TRAK
from skattr.estimators.loss_kernel import LossKernel
from skattr.metrics import SubsetRetrainer
from skattr.parallel import BlockError, block_gram
from skattr.store import FeatureStore

try:
    from dask.distributed import Client, LocalCluster
except ImportError:  # pragma: no cover
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("dask.distributed is not installed", allow_module_level=True)

MAGIC = 7.75  # an input value no normal draw takes: marks the row a KillNet acts on


class KillNet(torch.nn.Module):
    """An MLP whose forward pass, once the file ``sentinel`` exists and the batch holds a row
    starting with MAGIC, deletes the file and kills its process (``mode="exit"``) or raises
    (``mode="raise"``): a worker dying (or failing) in the middle of one block, once."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
        self.sentinel, self.mode, self.log = None, "exit", None

    def forward(self, x):
        if self.log:  # which block (its first row's first input) this process runs
            with open(self.log, "a") as fh:
                fh.write(f"{os.getpid()} {float(x[0, 0])!r}\n")
        if self.sentinel and bool((x[:, 0] == MAGIC).any()) and os.path.exists(self.sentinel):
            os.remove(self.sentinel)
            if self.mode == "exit":
                os._exit(3)
            raise ValueError("simulated failure in the forward pass")
        return self.body(x)


class KillStore(FeatureStore):
    """A feature store whose read of block ``kill_block`` in a process other than ``parent``
    kills that process (``mode="exit"``: once, while the file ``sentinel`` exists, which it
    deletes; ``"always"``: every time) or raises (``"raise"``, every time): a worker dying or
    failing while it reads its block for the Gram matrix or the scores."""

    kill_block, sentinel, mode, parent = None, None, "exit", None

    def read(self, m, b, mmap=True):
        if b == self.kill_block and os.getpid() != self.parent:
            if self.mode == "always":
                os._exit(3)
            if self.mode == "raise":
                raise ValueError("simulated failure reading a block")
            if self.sentinel and os.path.exists(self.sentinel):
                os.remove(self.sentinel)
                os._exit(3)
        return super().read(m, b, mmap)


def _within(seconds, fn):
    """``fn()`` under the Dask backend in a thread: its result, or a test failure if it has
    not returned after ``seconds`` (a hang fails instead of blocking the run)."""
    box = {}

    def run():
        try:
            with joblib.parallel_config(backend="dask"):
                box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["exc"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        pytest.fail(f"no result after {seconds} s: the run hangs")
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype("float32")
    y = ((X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)) % 3
    return X, y


@pytest.fixture(scope="module")
def client():
    # the workers import this module (KillNet) from tests/
    cluster = LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
        silence_logs=logging.CRITICAL, env={"PYTHONPATH": str(Path(__file__).parent)},
    )
    cl = Client(cluster)
    yield cl
    cl.close()
    cluster.close()


@pytest.fixture(scope="module")
def setup():
    X, y = _data(80)
    X[45, 0] = MAGIC  # in block 4 of 10-row blocks
    Xt, yt = _data(9, seed=1)
    torch.manual_seed(0)
    model = TorchModel(KillNet(), epochs=3, lr=0.1, random_state=0).fit(X, y)
    return model, X, y, Xt, yt


def _state(model):
    return {k: v.detach().clone() for k, v in model.module_.state_dict().items()}


def test_trak_on_dask_equals_one_process(client, setup, tmp_path):
    """TRAK-2 (members trained, features, Gram, scores, score store, top-k) through Dask equals
    the same computation in this process bit for bit."""
    model, X, y, Xt, yt = setup
    kw = dict(projection_dim=16, n_models=2, block_size=10)
    ref = TRAK(model, **kw, store=tmp_path / "ref").fit(X, y)
    S = ref.attribute(Xt, yt)
    with joblib.parallel_config(backend="dask"):
        d = TRAK(model, **kw, store=tmp_path / "dask").fit(X, y)
        S_d = d.attribute(Xt, yt)
        st = d.attribute(Xt, yt, out=tmp_path / "scores")
        top = d.top_k(Xt, yt, k=5)
    writers = {st.marker(0, b)["writer"] for b in range(st.n_blocks)}
    assert len(writers) == 2 and all(w.split(":")[1] != str(os.getpid()) for w in writers)
    for a, b in zip(ref.models_, d.models_):
        sa, sb = _state(a), _state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    np.testing.assert_array_equal(stored_features(d), stored_features(ref))
    np.testing.assert_array_equal(d.cholesky_[0], ref.cholesky_[0])
    np.testing.assert_array_equal(S_d, S)
    np.testing.assert_array_equal(np.asarray(st), S)
    np.testing.assert_array_equal(top.proponents, np.argsort(-S, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(top.opponents, np.argsort(S, axis=1, kind="stable")[:, :5])


def test_lds_on_dask_equals_one_process(client, setup):
    """The LDS's subset models trained on the cluster equal the local ones bit for bit, and so
    does the LDS."""
    model, X, y, Xt, yt = setup
    ref = SubsetRetrainer(model, n_subsets=3).fit(X, y)
    with joblib.parallel_config(backend="dask"):
        d = SubsetRetrainer(model, n_subsets=3).fit(X, y)
    for a, b in zip(ref.models_, d.models_):
        sa, sb = _state(a), _state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    trak = TRAK(model, projection_dim=16).fit(X, y)
    assert d.score(trak, Xt, yt) == ref.score(trak, Xt, yt)


def test_loss_kernel_chains_on_dask(client, setup):
    """SGLD chains on the cluster: each chain is the local chain (loss traces equal bit for
    bit); the kernel pools per-chain accumulators instead of one shared accumulator, so it
    equals the local kernel to float64 rounding (rtol 1e-10)."""
    model, X, y, _, _ = setup
    kw = dict(n_chains=2, n_draws=8, burn_in=4, thin=1, step_size=1e-4, keep=None)
    ref = LossKernel(model, **kw, n_jobs=1).fit(X[:40], y[:40])
    with joblib.parallel_config(backend="dask"):
        d = LossKernel(model, **kw).fit(X[:40], y[:40])
    np.testing.assert_array_equal(d.loss_traces_, ref.loss_traces_)
    np.testing.assert_allclose(d.kernel_, ref.kernel_, rtol=1e-10, atol=1e-12)


def _runs(log, X):
    """How many times a worker featurised each 10-row block (from the KillNet log; the forward
    passes of this process are left out)."""
    first = {float(X[10 * b, 0]): b for b in range(8)}
    counts = dict.fromkeys(range(8), 0)
    lines = Path(log).read_text().splitlines() if Path(log).exists() else []
    for pid, value in (line.split() for line in lines):
        if int(pid) != os.getpid() and float(value) in first:
            counts[first[float(value)]] += 1
    return counts


@contextlib.contextmanager
def _kill_once(model, tmp_path):
    """The KillNet of ``model`` set to kill its worker once (in block 4) and to log its forward
    passes; reset afterwards."""
    net = model.module_
    net.sentinel, net.log = str(tmp_path / "kill-once"), str(tmp_path / "log")
    Path(net.sentinel).touch()
    try:
        yield net
    finally:
        net.sentinel, net.mode, net.log = None, "exit", None


def test_killed_worker_then_resume(client, setup, tmp_path):
    """A worker process dies in the middle of the featurisation (in block 4): Dask reruns that
    block on a live worker, every other block runs once (counted from the forward passes the
    workers log), and the features equal those of a run
    in this process bit for bit; a rerun on the same store recomputes nothing.  A worker that
    raises stops the run with an error naming the block, its rows and the worker; the blocks
    finished before are kept and the rerun computes only the others."""
    model, X, y, _, _ = setup
    kw = dict(projection_dim=16, block_size=10)
    ref = TRAK(model, **kw, store=tmp_path / "ref").fit(X, y)
    with _kill_once(model, tmp_path) as net:
        trak = TRAK(model, **kw, store=tmp_path / "run")
        pids_before = set(client.run(os.getpid).values())
        with joblib.parallel_config(backend="dask"):
            trak.fit(X, y)
        assert not Path(net.sentinel).exists()  # it ran, and killed its worker
        client.wait_for_workers(2, timeout=120)
        assert set(client.run(os.getpid).values()) != pids_before  # the nanny restarted it
        runs = _runs(net.log, X)
        c = runs[0]  # forward passes of one block's featurisation
        # the killed block runs again, each other block once
        assert c >= 1 and runs[4] > c and runs == {**dict.fromkeys(range(8), c), 4: runs[4]}, \
            Path(net.log).read_text()
        np.testing.assert_array_equal(stored_features(trak), stored_features(ref))
        with joblib.parallel_config(backend="dask"):
            trak.fit(X, y)
        assert _runs(net.log, X) == runs  # nothing recomputed

        # a worker that raises: the error names the block, its rows and the worker
        net.mode = "raise"
        Path(net.sentinel).touch()
        Path(net.log).unlink()
        failing = TRAK(model, **kw, store=tmp_path / "raise")
        with joblib.parallel_config(backend="dask"):
            with pytest.raises(BlockError, match=r"block 4 of model 0 \(rows 40:50\) failed on "
                                                 r"worker \S+:\d+: ValueError: simulated failure"):
                failing.fit(X, y)
        first = _runs(net.log, X)
        (folder,) = (tmp_path / "raise").glob("store-*")
        kept = {int(p.name[6:12]) for p in folder.glob("*.done")}
        assert 4 not in kept
        with joblib.parallel_config(backend="dask"):
            failing.fit(X, y)
        again = _runs(net.log, X)
        assert all(again[b] == first[b] for b in kept)  # finished blocks: not recomputed
        assert again[4] == first[4] + c and all(again[b] >= c for b in range(8))
        np.testing.assert_array_equal(stored_features(failing), stored_features(ref))


def test_killed_worker_with_arguments_over_1kB_is_rerun(client, setup, tmp_path):
    """Blocks of 50 rows (1.2 kB of X per task): joblib would scatter such arguments to one
    worker without replicas, so the task could not be rerun once that worker died ("already
    forgotten"); skattr's backend sends them with the task, and Dask reruns it."""
    model, X, y, _, _ = setup
    kw = dict(projection_dim=16, block_size=50)
    assert X[:50].nbytes > 1000
    ref = TRAK(model, **kw, store=tmp_path / "ref").fit(X, y)
    try:
        with _kill_once(model, tmp_path) as net:
            trak = TRAK(model, **kw, store=tmp_path / "run")
            _within(180, lambda: trak.fit(X, y))
            assert not Path(net.sentinel).exists()  # it ran, and killed its worker
            np.testing.assert_array_equal(stored_features(trak), stored_features(ref))
    finally:
        client.wait_for_workers(2, timeout=120)


def _kill_store(trak, tmp_path, block, mode):
    st = trak.store_
    st.__class__ = KillStore
    st.kill_block, st.mode, st.parent = block, mode, os.getpid()
    st.sentinel = str(tmp_path / f"kill-{mode}")
    Path(st.sentinel).touch()
    return st


def _score_tokens(st):
    return {b: st.marker(0, b)["token"] for b in range(st.n_blocks) if st.marker(0, b)}


def test_gram_and_scores_survive_a_killed_worker(client, setup, tmp_path):
    """A worker dies reading block 4 for the Gram matrix, then for the score store: Dask reruns
    the block on a live worker and both equal the one-process result bit for bit."""
    model, X, y, Xt, yt = setup
    trak = TRAK(model, projection_dim=16, block_size=10, store=tmp_path / "f").fit(X, y)
    S = trak.attribute(Xt, yt)
    U = block_gram(trak.store_, 0, torch.float64, torch.float64, n_jobs=1)
    try:
        st = _kill_store(trak, tmp_path, 4, "exit")
        U_d = _within(180, lambda: block_gram(st, 0, torch.float64, torch.float64))
        assert not Path(st.sentinel).exists()  # it ran, and killed its worker
        torch.testing.assert_close(U_d, U, rtol=0, atol=0)
        client.wait_for_workers(1, timeout=120)
        Path(st.sentinel).touch()
        out = _within(180, lambda: trak.attribute(Xt, yt, out=tmp_path / "s"))
        assert not Path(st.sentinel).exists()
        np.testing.assert_array_equal(np.asarray(out), S)
    finally:
        trak.store_.__class__ = FeatureStore


def test_block_raising_or_killing_every_worker_is_named(client, setup, tmp_path):
    """Reading block 3 raises in a worker: the score store stops with an error naming the block
    and the worker, the blocks finished before are kept and the rerun computes only the
    others, equal to the one-process scores.  Then block 3 kills every worker that reads it
    (the scheduler allows no retry here): the Gram matrix stops with an error naming a block
    (Dask's KilledWorker), where joblib's own Dask backend would wait forever."""
    model, X, y, Xt, yt = setup
    trak = TRAK(model, projection_dim=16, block_size=10, store=tmp_path / "f").fit(X, y)
    S = trak.attribute(Xt, yt)
    def set_allowed(n):
        client.run_on_scheduler(
            lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", n))

    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    try:
        st = _kill_store(trak, tmp_path, 3, "raise")
        with pytest.raises(BlockError, match=r"Scoring training block 3 failed on worker \S+:\d+: "
                                             r"ValueError: simulated failure reading a block"):
            _within(180, lambda: trak.attribute(Xt, yt, out=tmp_path / "s"))
        st.__class__ = FeatureStore
        folder = tmp_path / "s"
        kept = {f.name: f.read_text() for f in folder.glob("*.done")}
        assert "m000_b000003.done" not in kept
        out = _within(180, lambda: trak.attribute(Xt, yt, out=folder))
        assert all((folder / n).read_text() == t for n, t in kept.items())  # not recomputed
        assert len(list(folder.glob("*.done"))) == 8
        np.testing.assert_array_equal(np.asarray(out), S)

        st.__class__, st.mode = KillStore, "always"
        set_allowed(0)
        # the tasks queued on the dying worker fail with it: the error names the first of them
        with pytest.raises(BlockError, match=r"worker running the Gram product of block \d of "
                                             r"model 0 died or failed on every try \(KilledWorker"):
            _within(180, lambda: block_gram(st, 0, torch.float64, torch.float64))
    finally:
        trak.store_.__class__ = FeatureStore
        set_allowed(allowed)


def test_one_worker_up_still_uses_the_cluster(client, setup, tmp_path, monkeypatch):
    """With one worker up (a one-worker cluster, or the other restarting) joblib's Dask backend
    would run the tasks one by one in this process: the score blocks are still written by the
    cluster's workers, and equal the one-process scores."""
    model, X, y, Xt, yt = setup
    trak = TRAK(model, projection_dim=16, block_size=10, store=tmp_path / "f").fit(X, y)
    S = trak.attribute(Xt, yt)
    one = dict(list(client.ncores().items())[:1])
    monkeypatch.setattr(type(client), "ncores", lambda self, *a, **k: one)
    st = _within(180, lambda: trak.attribute(Xt, yt, out=tmp_path / "s"))
    writers = {st.marker(0, b)["writer"] for b in range(st.n_blocks)}
    assert writers and all(w.split(":")[1] != str(os.getpid()) for w in writers)
    np.testing.assert_array_equal(np.asarray(st), S)
