"""Symmetric products from upper-triangle panels (skattr._linalg) against the plain product."""

import pytest
import torch

from skattr._linalg import sym_gram, upper_gram


@pytest.mark.parametrize("n", [1, 63, 64, 130, 517])
def test_sym_and_upper_gram_equal_the_full_product(n):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, 37, generator=g, dtype=torch.float64)
    base = torch.randn(n, n, generator=g, dtype=torch.float64)
    base = base + base.T
    full = A @ A.T
    G = sym_gram(A)
    torch.testing.assert_close(G, full, rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)  # mirrored, exactly symmetric
    torch.testing.assert_close(sym_gram(A, base=base), full + base, rtol=1e-12, atol=1e-12)
    U = upper_gram(A, torch.float32)
    assert U.dtype == torch.float32
    iu = torch.triu_indices(n, n)
    torch.testing.assert_close(U[iu[0], iu[1]].double(), full[iu[0], iu[1]], rtol=1e-5, atol=1e-5)
