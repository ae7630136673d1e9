"""Exact multi-output features: one flatten of the (rows, m, p) records copied in (before da07b15) vs
write_flat output by output (featurize_batches now), on the same records in one process.

    OMP_NUM_THREADS=1 python benchmarks/ab_multioutput_features.py
"""
import time, torch, numpy as np
from torch import nn
torch.set_num_threads(1)
from skattr import gradients as G
from skattr.featurize import write_flat, output_records
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
x = torch.randn(256, 64)
recs = G.compute_records(net, x, output="logits")
n, m = G.records_shape(recs)[:2]; p = G.n_parameters(net)
o1 = torch.empty(n, m, p); o2 = torch.empty(n, m, p)
def old(): o1.copy_(G.flatten(recs))
def new():
    for j in range(m): write_flat(output_records(recs, j), o2[:, j])
old(); new(); assert torch.equal(o1, o2), (o1 - o2).abs().max()
to, tn = [], []
for _ in range(7):
    t = time.perf_counter(); old(); to.append(time.perf_counter() - t)
    t = time.perf_counter(); new(); tn.append(time.perf_counter() - t)
print(f"records of 256 examples x 10 logits x {p} params: flatten+copy {np.median(to):.3f} s, per-output write_flat {np.median(tn):.3f} s, ratio old/new {np.median(to)/np.median(tn):.2f}; equal: True")
