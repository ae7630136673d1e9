"""Fingerprints: stable hashes of data, models and settings, for caches and stores."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

__all__ = ["config_key", "data_hash", "template_hash"]


def config_key(config) -> str:
    """A short, stable hash of a JSON-serialisable description."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def data_hash(*arrays) -> str:
    """A content hash of arrays / tensors (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"None")
            continue
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(np.asarray(a))
        h.update(repr((a.shape, a.dtype.str)).encode())
        if a.dtype == object:
            h.update(repr(a.tolist()).encode())
        else:
            h.update(a.tobytes())
    return h.hexdigest()


def template_hash(model):
    """A hash of a TorchModel's training settings and architecture (not of its random init).

    ``fit`` re-initialises the module from ``random_state`` (unless ``warm_start``), so two
    templates that differ only in their initial weights train identical models.
    """
    import joblib

    params = model.get_params(deep=False)
    module = params.pop("module")
    params.pop("verbose", None)
    desc = {"params": joblib.hash(params), "module": repr(module),
            "shapes": [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]}
    if model.warm_start:
        desc["weights"] = joblib.hash({k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    return config_key(desc)
