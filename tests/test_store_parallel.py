"""The many-writer block store, blockwise scoring and joblib parallelism, without Dask.

Concurrent writers are real processes (``fork``: no interpreter start-up); joblib runs use the
threading backend (the same code path as processes: jobs, shards, markers, error wrapping) so
the tests stay fast.  Dask and process pools: ``tests/test_dask.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import joblib
import numpy as np
import pytest
import torch
from conftest import stored_features

from skattr import TorchModel
from skattr.estimators import TRAK
from skattr.featurize import Featurizer
from skattr.parallel import BlockError
from skattr.store import FeatureStore, ScoreStore


def _data(n, seed=0, d=6, c=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype("float32")
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1).astype(int)
    return X, y % c


@pytest.fixture(scope="module")
def setup():
    X, y = _data(90)
    Xt, yt = _data(11, seed=1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    model = TorchModel(net, epochs=3, lr=0.1, random_state=0).fit(X, y)
    return model, X, y, Xt, yt


def _tokens(store):
    return {(m, b): store.marker(m, b)["token"]
            for m in range(getattr(store, "n_models", 1)) for b in range(store.n_blocks)
            if store.marker(m, b)}


# ---------------------------------------------------------------------------- the store
def _write_blocks(args):
    path, blocks = args
    st = FeatureStore(path, n_rows=50, dim=4, n_models=2, block_size=10, meta={"x": 1})
    for m, b in blocks:
        r0, r1 = st.block_range(b)
        F = np.arange(r0 * 4, r1 * 4, dtype="float32").reshape(-1, 4) + 1000 * m
        st.write(m, b, F, np.full(r1 - r0, m, "float32"))
    return os.getpid()


def test_many_processes_write_one_store(tmp_path):
    """Four processes write 2 x 5 blocks at once, two of them the same blocks (a retried task):
    every block is complete and holds exactly its rows; no temporary file is left; the markers
    name the process that wrote them."""
    path = tmp_path / "st"
    jobs = [(path, [(m, b) for m in range(2) for b in range(5) if (b + m) % 3 == i % 3])
            for i in range(3)] + [(path, [(m, b) for m in range(2) for b in range(5)])]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pids = pool.map(_write_blocks, jobs)
    st = FeatureStore(path, n_rows=50, dim=4, n_models=2, block_size=10, meta={"x": 1})
    assert st.missing() == [] and not list(path.glob("*.tmp"))
    for m in range(2):
        F = np.concatenate([np.asarray(F) for _, _, F, _ in st.iter_blocks(m)])
        np.testing.assert_array_equal(F, np.arange(200, dtype="float32").reshape(50, 4) + 1000 * m)
        np.testing.assert_array_equal(st.q(m), np.full(50, m, "float32"))
    writers = {int(st.marker(m, b)["writer"].split(":")[1]) for m in range(2) for b in range(5)}
    assert writers and writers <= set(pids)  # the last to finish a block marks it
    assert all(st.marker(m, b)["rows"] == [10 * b, 10 * b + 10] for m in range(2) for b in range(5))


def test_store_of_another_configuration_is_refused(tmp_path):
    st = FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2, meta={"k": 3})
    st.write(0, 0, np.ones((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=f"{tmp_path}.*created for other meta \\(k=3, now 4\\)"):
        FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2, meta={"k": 4})
    with pytest.raises(ValueError, match="created with block_size=2"):
        FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=3, meta={"k": 3})
    # nothing already computed was lost
    assert FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2, meta={"k": 3}).missing() == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="not a skattr score store"):
        ScoreStore(tmp_path, n_targets=2, n_train=5, block_size=2)


def test_version1_manifest_is_upgraded(tmp_path):
    """A store written before the markers (its manifest lists the finished blocks) keeps them."""
    st = FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2)
    st.write(0, 1, np.ones((2, 3)), np.zeros(2))
    st._marker(0, 1).unlink()
    man = json.loads((tmp_path / "manifest.json").read_text())
    man.update(version=1, done={"0": [1]})
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    again = FeatureStore(tmp_path, n_rows=5, dim=3, n_models=1, block_size=2)
    assert again.missing() == [(0, 0), (0, 2)]


def test_missing_block_is_named_then_recomputed_alone(setup, tmp_path, monkeypatch):
    """A deleted block: scoring raises naming the block and the folder; a refit recomputes that
    block only (one featurisation) and gives the same scores."""
    model, X, y, Xt, yt = setup
    trak = TRAK(model, projection_dim=16, store=tmp_path, block_size=20).fit(X, y)
    ref = trak.attribute(Xt, yt)
    before = _tokens(trak.store_)
    trak.store_._file(0, 2, "f").unlink()
    with pytest.raises(ValueError, match=f"block 2, rows \\(40, 60\\)\\) at {trak.store_.path} is missing"):
        trak.attribute(Xt, yt)
    calls = []
    orig = Featurizer.rows
    monkeypatch.setattr(Featurizer, "rows", lambda self, *a, **k: calls.append(a[2]) or orig(self, *a, **k))
    for g in trak.store_.path.glob("*gram*"):
        g.unlink()
    with pytest.warns(UserWarning, match="block \\(model 0, block 2\\).*missing or damaged"):
        again = TRAK(model, projection_dim=16, store=tmp_path, block_size=20).fit(X, y)
    assert calls == [40]
    after = _tokens(again.store_)
    assert {k for k in before if before[k] != after[k]} == {(0, 2)}
    np.testing.assert_array_equal(again.attribute(Xt, yt), ref)


# ---------------------------------------------------------------------------- parallel = serial
def test_parallel_featurisation_equals_serial(setup, tmp_path):
    """TRAK-2 featurised by 2 joblib workers (threads) into an on-disk store and into memory:
    the features and scores equal the serial ones exactly; another block size gives features
    equal to float32 rounding (gradient batches split differently) and the same top-k."""
    model, X, y, Xt, yt = setup
    kw = dict(projection_dim=24, models=[model, model])  # two members: two projection seeds
    ser = TRAK(model, **kw, store=tmp_path / "a", block_size=20).fit(X, y)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        par = TRAK(model, **kw, store=tmp_path / "b", block_size=20).fit(X, y)
        mem = TRAK(model, **kw, block_size=20).fit(X, y)
    np.testing.assert_array_equal(stored_features(par), stored_features(ser))
    np.testing.assert_array_equal(stored_features(mem), stored_features(ser))
    np.testing.assert_array_equal(par.attribute(Xt, yt), ser.attribute(Xt, yt))
    other = TRAK(model, **kw, store=tmp_path / "c", block_size=13, batch_size=13).fit(X, y)
    np.testing.assert_allclose(stored_features(other), stored_features(ser), rtol=1e-5, atol=1e-7)


def test_scores_written_blockwise(setup, tmp_path):
    """attribute(out=folder) equals attribute() exactly (serial and 2 threads), a rerun skips
    its finished blocks, and other targets are refused in the same folder; top_k streamed
    through blocks equals the stable argsort of the full matrix."""
    model, X, y, Xt, yt = setup
    trak = TRAK(model, projection_dim=16, store=tmp_path / "f", block_size=20).fit(X, y)
    S = trak.attribute(Xt, yt)
    st = trak.attribute(Xt, yt, out=tmp_path / "s1")
    assert isinstance(st, ScoreStore) and st.shape == S.shape and st.n_blocks == 5
    np.testing.assert_array_equal(np.asarray(st), S)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        st2 = trak.attribute(Xt, yt, out=tmp_path / "s2")
        tk = trak.top_k(Xt, yt, k=7)
    np.testing.assert_array_equal(np.asarray(st2), S)
    before = _tokens(st2)
    trak.attribute(Xt, yt, out=tmp_path / "s2")
    assert _tokens(ScoreStore(tmp_path / "s2", n_targets=11, n_train=90, block_size=20,
                              meta=st2.meta)) == before
    with pytest.raises(ValueError, match=r"score store at .*s2 was created for other meta \(targets: other X / y\)"):
        trak.attribute(Xt[:11] + 1, yt, out=tmp_path / "s2")
    st._file(0, 1, "s").unlink()  # a lost score block: the error says what recomputes it
    with pytest.raises(ValueError, match=r"block 1.*missing.*call attribute\(X, y, out=<this folder>\) again"):
        np.asarray(st)
    np.testing.assert_array_equal(np.asarray(trak.attribute(Xt, yt, out=tmp_path / "s1")), S)
    for res in (tk, trak.top_k(Xt, yt, k=7), st.top_k(7)):
        pro = np.argsort(-S, axis=1, kind="stable")[:, :7]
        opp = np.argsort(S, axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(res.proponents, pro)
        np.testing.assert_array_equal(res.opponents, opp)
        np.testing.assert_array_equal(res.proponent_scores, np.take_along_axis(S, pro, 1))


def test_top_k_ties_follow_the_stable_sort():
    S = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    from skattr.store import top_k_blocks

    res = top_k_blocks([(0, S[:, :4]), (4, S[:, 4:])], 2, 6, 4)
    np.testing.assert_array_equal(res.proponents, np.argsort(-S, 1, kind="stable")[:, :4])
    np.testing.assert_array_equal(res.opponents, np.argsort(S, 1, kind="stable")[:, :4])
    with pytest.raises(ValueError, match="k must lie in \\[1, n_train=6\\]"):
        top_k_blocks([(0, S)], 2, 6, 7)


def test_failing_block_names_block_and_worker_and_resumes(setup, tmp_path, monkeypatch):
    """A block whose featurisation raises in a worker: the error names the block, its rows and
    the worker; the blocks finished before are kept, and the refit computes only the others."""
    model, X, y, Xt, yt = setup
    orig = Featurizer.rows
    state = {"fail": True}

    def rows(self, Xs, ys, r0, r1, **k):
        if state["fail"] and Xs.shape[0] == 10 and np.array_equal(np.asarray(Xs), X[60:70]):
            raise RuntimeError("simulated failure")
        return orig(self, Xs, ys, r0, r1, **k)

    monkeypatch.setattr(Featurizer, "rows", rows)
    trak = TRAK(model, projection_dim=16, store=tmp_path, block_size=10)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        with pytest.raises(BlockError, match=r"block 6 of model 0 \(rows 60:70\) failed on worker "
                                             r"\S+:\d+: RuntimeError: simulated failure.*fit again"):
            trak.fit(X, y)
    (folder,) = tmp_path.glob("store-*")
    done = {p.name for p in folder.glob("*.done")}
    assert "m000_b000006.done" not in done and len(done) >= 1
    kept = {n: (folder / n).read_text() for n in done}
    state["fail"] = False
    with joblib.parallel_config(backend="threading", n_jobs=2):
        trak.fit(X, y)
    assert all((folder / n).read_text() == kept[n] for n in kept)  # not recomputed
    assert len(list(folder.glob("*.done"))) == 9
    ref = TRAK(model, projection_dim=16, block_size=10).fit(X, y)
    np.testing.assert_array_equal(stored_features(trak), stored_features(ref))
