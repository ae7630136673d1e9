"""The memory planner (``skattr._memory``, ``gradients.compute_records``) against what is really
allocated: planned chunks fit the budget, the per-example estimate bounds the records' actual
bytes, the projector's planned rows bound what it keeps, and a child process's peak RSS growth
stays under the budget where the same call without a budget overruns it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from skattr import _memory
from skattr import gradients as G
from skattr.projection import _CACHE_TOTAL_SHARE, Projector


def _net(name):
    torch.manual_seed(0)
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 36, 4)).eval(), (1, 6, 6)
    if name == "mlp":
        return nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3)).eval(), (5,)
    if name == "gru":
        class R(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn, self.fc = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 3)

            def forward(self, x):
                return self.fc(self.rnn(x)[0][:, -1])

        return R().eval(), (4, 3)
    raise ValueError(name)


def _tensor_bytes(records):
    """Bytes of the tensors the records hold, from their storages (independent of nbytes())."""
    seen, total = set(), 0
    for r in records:
        for t in ([r.x, r.d] if isinstance(r, G.KronRecord) else [r.g]):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@settings(max_examples=8, deadline=None, derandomize=True)
@given(name=st.sampled_from(["cnn", "mlp", "gru"]), method=st.sampled_from(["auto", "vmap"]),
       n=st.integers(1, 24), budget_kib=st.integers(64, 4096), reserved_kib=st.integers(0, 32))
def test_planned_chunks_fit_the_budget(name, method, n, budget_kib, reserved_kib):
    """The chunk is the largest whose planned bytes fit the usable budget, and the estimate
    per example bounds the bytes of the records the engine returns for that chunk."""
    net, shape = _net(name)
    X = torch.randn(n, *shape)
    budget, reserved = budget_kib * 1024, reserved_kib * 1024
    info = {}
    try:
        recs = G.compute_records(net, X, method=method, budget=budget, reserved=reserved,
                                 info=info)
    except MemoryError as exc:  # only when one example does not fit
        assert "one example" in str(exc)
        engine = G._choose(net, None, method)[0]
        per, fixed = G._probe(net, X, "logits", torch.zeros(n, dtype=torch.long), None, None,
                              engine)[:2]
        assert fixed + reserved + per > _memory.usable(budget)
        return
    c, per, fixed = info["chunk_size"], info["bytes_per_example"], info["fixed_bytes"]
    assert fixed >= reserved
    assert fixed + c * per <= _memory.usable(budget) < budget
    assert c == n or fixed + (c + 1) * per > _memory.usable(budget)  # the largest that fits
    # the records of one chunk, measured from their storages, within the estimate
    chunk = next(recs.chunks())[2] if isinstance(recs, G.DeferredRecords) else recs
    rows = G.records_shape(chunk)[0]
    assert _tensor_bytes(chunk) <= rows * info["kept_bytes_per_example"] <= rows * per
    if not info["deferred"]:
        assert fixed + n * info["kept_bytes_per_example"] <= _memory.usable(budget) or c == n


def _nbytes(t):
    if t.layout == torch.sparse_csr:
        return sum(_nbytes(u) for u in (t.crow_indices(), t.col_indices(), t.values()))
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("kind", ["gaussian", "factored", "kronecker", "sparse"])
def test_projector_planned_bytes_bound_what_it_keeps(kind, monkeypatch):
    """What a projector keeps after projecting a batch is at most what the planner counted,
    and at least the rows it must keep (planned minus the largest generated block); with a
    small budget its dense rows are generated in blocks instead of kept."""
    net, shape = _net("cnn")
    X = torch.randn(6, *shape)
    for budget in ("1GiB", "64KiB"):
        monkeypatch.setenv(_memory.ENV_VAR, budget)
        info = {}
        proj = Projector(kind, 64, 0)
        recs = G.compute_records(net, X, info=info, projector=proj, budget=2**40)
        groups = G._probe(net, X, "logits", torch.zeros(6, dtype=torch.long), None, None,
                          info["engine"])[4]
        planned = proj.planned_bytes(groups)
        full = G.project(recs, proj)
        kept = sum(_nbytes(t) for v in proj._cache.values()
                   for t in (v if isinstance(v, tuple) else (v,)))
        assert kept <= planned
        if budget == "64KiB":  # rows kept within the budget's share; the rest generated
            if kind == "gaussian":
                assert kept <= 64 * 1024 * _CACHE_TOTAL_SHARE
        # the same features whatever was kept
        torch.testing.assert_close(G.project(recs, Projector(kind, 64, 0)), full)


def test_deferred_gram_with_itself_is_symmetric_and_exact():
    """A deferred Gram with itself mirrors its lower blocks: equal to the unchunked Gram,
    exactly symmetric; iterated records are sliced, not recomputed."""
    net, shape = _net("cnn")
    net = net.double()
    X = torch.randn(10, *shape, dtype=torch.float64)
    full = G.compute_records(net, X, budget=2**40)
    info = {}
    G.compute_records(net, X, budget=2**40, info=info)
    budget = int((3 * info["bytes_per_example"]) / (1 - _memory.SLACK)) + 1
    calls = []
    recs = G.compute_records(net, X, budget=budget, info=info)
    assert info["deferred"] and info["chunk_size"] == 3
    compute = recs._compute
    recs._compute = lambda i0, i1: calls.append((i0, i1)) or compute(i0, i1)
    K = G.gram(recs, recs)
    assert torch.equal(K, K.T)
    torch.testing.assert_close(K, G.gram(full, full), rtol=1e-12, atol=0)
    torch.testing.assert_close(G.gram(recs, recs, "full"), G.gram(full, full, "full"),
                               rtol=1e-12, atol=1e-12)
    # 4 chunks: 4 outer + 3 + 2 + 1 inner computations (not 4 + 16), for the trace Gram
    assert len(calls) >= 10 and calls[:10] == [(0, 3), (3, 6), (6, 9), (9, 10), (3, 6), (6, 9),
                                               (9, 10), (6, 9), (9, 10), (9, 10)]
    list(recs)  # forms all records once
    calls.clear()
    torch.testing.assert_close(G.self_gram(recs), G.self_gram(full), rtol=1e-12, atol=0)
    assert calls == []


# what both child-process scripts start with: one thread, and status(field) from /proc/self/status
_CHILD_PREAMBLE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from torch import nn
    from skattr import TorchModel

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
""")


def _run_child(script, budget, *args):
    """``script``'s last line of output (JSON) in a child process under ``budget``."""
    env = dict(os.environ, SKATTR_MEMORY_BUDGET=str(budget), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_CHILD = _CHILD_PREAMBLE + textwrap.dedent("""
    from skattr.estimators import TraceNTK
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 64, 10)).eval()
    X = np.random.RandomState(0).rand(int(sys.argv[1]), 1, 8, 8).astype(np.float32)
    model = TorchModel(net)
    kw = dict(projection_dim=256, method="vmap", normalize=False)
    TraceNTK(model, batch_size=2, **kw).fit(X[:4])
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    TraceNTK(model, batch_size=len(X), **kw).fit(X)
    print(json.dumps({"growth": status("VmHWM") - base}))
""")


def _growth(n, budget):
    return _run_child(_CHILD, budget, n)["growth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_growth_stays_within_the_budget():
    """A child process's peak RSS growth (VmHWM after a reset) for a projected vmap fit of 128
    samples: under the 32 MiB budget, while the same call with no effective budget grows by
    more than twice that (so the measurement can see an overrun).

    Tolerance: none beyond the budget itself; the planner keeps ``SLACK`` (1/8) of it for the
    allocator, and bench_memory.py measures the growth at 256 and 4,096 samples."""
    budget = 32 * 2**20
    unplanned = _growth(128, "1TiB")
    planned = _growth(128, str(budget))
    assert unplanned > 2 * budget, unplanned / 2**20
    assert planned <= budget, planned / 2**20


def test_an_output_larger_than_the_budget_is_said_not_refused():
    """A caller's output that leaves no room for one example does not raise (each example
    fits): the budget then bounds the working memory alone, with a warning naming both."""
    net, shape = _net("mlp")
    X = torch.randn(8, *shape)
    info = {}
    G.compute_records(net, X, budget=2**40, info=info)
    budget = int(4 * info["bytes_per_example"] / (1 - _memory.SLACK)) + 8
    with pytest.warns(UserWarning, match="does not fit the memory budget"):
        G.compute_records(net, X, budget=budget, reserved=budget, info=info)
    assert info["chunk_size"] == 4 and info["fixed_bytes"] < budget
    # an output that fits is counted: smaller chunks, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        G.compute_records(net, X, budget=budget, info=info,
                          reserved=3 * info["bytes_per_example"])
    assert info["chunk_size"] == 1


_CHILD_PEG = _CHILD_PREAMBLE + textwrap.dedent("""
    net = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                        nn.Linear(64, 10)).eval()
    n, k = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2]))
    X = np.random.RandomState(0).rand(n, 32).astype(np.float32)
    y = np.arange(n) % 10
    model = TorchModel(net)
    model.per_example_gradients(X[:4], y[:4], projection_dim=k)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    G = model.per_example_gradients(X, y, projection_dim=k)
    print(json.dumps({"growth": status("VmHWM") - base, "out": G.nbytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_per_example_gradients_peak_rss_within_the_budget():
    """TorchModel.per_example_gradients counts its result against the budget: a child's peak
    RSS growth for 600 loss gradients (31.5 MB) stays under a 48 MiB budget (before: the
    batches' flattened gradients and their concatenation, 72 MB, 2.3 times the result), and
    is at least the result (the measurement sees it)."""
    budget = 48 * 2**20
    res = _run_child(_CHILD_PEG, budget, 600, "none")
    assert res["out"] <= res["growth"] <= budget, res


def test_per_example_gradients_larger_than_the_budget_are_said():
    """A result larger than the budget on its own: a warning naming both sizes, and the same
    gradients as one autograd call per example (and as with a budget that holds them)."""
    from skattr import TorchModel

    net, shape = _net("mlp")
    net = net.double()
    X = torch.randn(12, *shape, dtype=torch.float64)
    y = torch.arange(12) % 3
    params = list(net.parameters())
    ref = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nn.functional.cross_entropy(net(X[i : i + 1]), y[i : i + 1]), params)])
        for i in range(12)]).numpy()
    model = TorchModel(net, dtype="float64", batch_size_eval=4)
    out_bytes = ref.nbytes  # 12 x 579 float64: 55.6 KB
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_memory.ENV_VAR, str(out_bytes // 2))
        with pytest.warns(UserWarning, match=r"per-example gradients returned \(12 x 1 x 579 "
                                             r"values.*do not fit the memory budget"):
            small = model.per_example_gradients(X, y.numpy())
        mp.setenv(_memory.ENV_VAR, "1GiB")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            large = model.per_example_gradients(X, y.numpy())
    torch.testing.assert_close(torch.as_tensor(small), torch.as_tensor(ref), rtol=1e-12, atol=1e-14)
    assert (small == large).all()  # the budget changes the chunks, not the values


@pytest.mark.parametrize("kind, formed", [("rademacher", True), ("gaussian", True),
                                          ("factored", False)])
def test_a_projection_that_forms_layer_gradients_is_planned(kind, formed):
    """A projection without factored rows forms each Linear layer's per-example gradient,
    (chunk, m, d_out * (d_in + 1)), while projecting it: the plan holds the largest one per
    example (before: not counted, so a 32 MiB Rademacher call grew by 36-40 MB); a factored
    projection forms none and is planned as before."""
    net, shape = _net("mlp")  # Linear(5, 64), Linear(64, 3): the largest layer 64 x 6 = 384
    X = torch.randn(8, *shape)
    largest = max(m.weight.numel() + m.bias.numel() for m in net if isinstance(m, nn.Linear))
    plain, projected = {}, {}
    G.compute_records(net, X, budget=2**40, info=plain)
    assert plain["engine"] == "structured"
    G.compute_records(net, X, budget=2**40, info=projected, projector=Projector(kind, 16, 0))
    extra = projected["bytes_per_example"] - plain["bytes_per_example"]
    m = 3  # the logits
    assert extra == (4 * m * largest if formed else 0)
