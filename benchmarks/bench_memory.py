"""Peak RSS growth of one featurisation call against the memory budget (issue 10).

Each measurement runs in a fresh child process: it builds the network, warms up (imports, one
tiny fit), resets the peak RSS (``/proc/self/clear_refs``), runs one call and reads ``VmHWM``
(peak resident set) from ``/proc/self/status``.  The growth is ``VmHWM`` after the call minus
``VmRSS`` before it: everything the call allocated and touched, its result included.

Calls (float32, one thread, ``SKATTR_MEMORY_BUDGET`` set in the child):

* ``resnet/vmap``: the residual CNN of ``bench_resnet.py`` (19,706 parameters, in-place ops),
  ``TraceNTK(projection_dim=512, method="vmap", batch_size=n).fit(X)``: the projected fallback,
  whole batch in one call (the planner must chunk it);
* ``resnet/structured``: the same with the structured engine;
* ``wide/structured``: an MLP 64-4096-10 (307k parameters), projected (factored rows);

at 256 and 4,096 samples, plus a control row with no effective budget (1 TiB), which shows what
the same call allocates unplanned (the measurement can see an overrun).

Run ``python benchmarks/bench_memory.py`` (``--quick``: 64 / 256 samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import print_table, proc_status  # noqa: E402


def build(net):
    torch.manual_seed(0)
    if net == "resnet":
        from bench_resnet import ResNetDigits

        return ResNetDigits().eval(), (1, 8, 8)
    if net == "wide":
        return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10)).eval(), (64,)
    raise ValueError(net)


def child(spec):
    """One measurement in this fresh process; prints a JSON line."""
    torch.set_num_threads(1)
    from skattr import TorchModel
    from skattr.estimators import TraceNTK

    net, shape = build(spec["net"])
    model = TorchModel(net)
    X = np.random.RandomState(0).rand(spec["n"], *shape).astype(np.float32)
    kw = dict(projection_dim=spec["k"], method=spec["method"], normalize=False)
    TraceNTK(model, batch_size=2, **kw).fit(X[:4])  # imports and lazy initialisation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = proc_status("VmRSS")
    est = TraceNTK(model, batch_size=spec["n"], **kw).fit(X)
    peak = proc_status("VmHWM")
    feats = est.features_
    print(json.dumps({"growth": peak - base, "result": feats.numel() * feats.element_size(),
                      "engine": est.engine_["engine"]}))


def measure(net, method, n, k, budget):
    env = dict(os.environ, SKATTR_MEMORY_BUDGET=str(budget), OMP_NUM_THREADS="1")
    spec = json.dumps({"net": net, "method": method, "n": n, "k": k})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="256MiB")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--cases", nargs="+", default=["resnet/vmap", "resnet/structured",
                                                  "wide/structured"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.sizes = [64, 256]
    from skattr._memory import SLACK, parse_bytes

    budget = parse_bytes(args.budget)
    print(f"torch {torch.__version__}; budget {args.budget} ({budget / 2**20:.0f} MiB), planner "
          f"slack {SLACK:.3f}; k = {args.k}; load avg {os.getloadavg()[0]:.2f}")
    rows = []
    for case in args.cases:
        net, method = case.split("/")
        runs = [(n, args.budget) for n in args.sizes] + [(args.sizes[0], "1TiB")]
        for n, b in runs:
            r = measure(net, method, n, args.k, b)
            g = r["growth"] / 2**20
            rows.append([case, r["engine"], n, b, f"{r['result'] / 2**20:.1f}", f"{g:.1f}",
                         f"{r['growth'] / budget:.2f}" if b == args.budget else "-"])
            print(rows[-1], flush=True)
    print_table(rows, ["network/engine", "ran", "samples", "budget", "result MiB",
                       "peak RSS growth MiB", "growth / budget"])


if __name__ == "__main__":
    main()
