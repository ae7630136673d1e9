"""skattr.datasets: shapes, seeding, the structure each generator promises, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from skattr.datasets import (
    DIGIT_GROUPS,
    digit_groups_distance,
    flip_labels,
    load_digits_images,
    make_hierarchy,
    make_multitask,
    make_multitask_subspaces,
    tree_distance,
)


def test_load_digits_images():
    X, y = load_digits_images()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0
    assert y.dtype == np.int64 and set(y.tolist()) == set(range(10))
    X2, y2 = load_digits_images(as_images=False)
    assert X2.shape == (1797, 64)
    np.testing.assert_array_equal(X2, X.reshape(len(X), -1))
    X3, y3 = load_digits_images(n_class=2)
    assert set(y3.tolist()) == {0, 1}


def test_flip_labels_exact_count_and_always_changed():
    y = np.repeat(np.arange(5), 40)
    yn, flipped = flip_labels(y, 0.1, random_state=0)
    assert flipped.sum() == 20
    assert np.all(yn[flipped] != y[flipped]) and np.all(yn[~flipped] == y[~flipped])
    assert set(yn.tolist()) <= set(y.tolist())
    yn2, f2 = flip_labels(y, 0.1, random_state=0)
    np.testing.assert_array_equal(yn, yn2)
    np.testing.assert_array_equal(flipped, f2)
    assert flip_labels(y, 0.0, random_state=0)[1].sum() == 0
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(y, 1.5)
    with pytest.raises(ValueError, match="2 classes"):
        flip_labels(np.zeros(5), 0.1)


def test_multitask_structure():
    X, y, task = make_multitask(200, n_tasks=4, n_bits=6, k=2, random_state=0)
    assert X.shape == (200, 4 + 4 * 6) and X.dtype == np.float32
    assert np.all(np.diff(task) >= 0)  # sorted by task
    assert np.bincount(task).tolist() == [50] * 4
    ind, bits = X[:, :4], X[:, 4:].reshape(200, 4, 6)
    np.testing.assert_array_equal(ind.argmax(1), task)
    for t in range(4):
        m = task == t
        # only the task's own block is active, with +-1 bits
        assert np.all(np.abs(bits[m, t]) == 1)
        assert np.all(bits[m][:, [u for u in range(4) if u != t]] == 0)
        assert set(y[m].tolist()) <= {2 * t, 2 * t + 1}
    # labels are a parity of k bits of the own block: a deterministic function of those bits
    for t in range(4):
        m = task == t
        b = bits[m, t]
        found = False
        for i in range(6):
            for j in range(i + 1, 6):
                par = (b[:, i] * b[:, j] < 0).astype(int) + 2 * t
                found |= np.array_equal(par, y[m])
        assert found
    _, y_sh, _ = make_multitask(200, n_tasks=4, n_bits=6, labels="shared", random_state=0)
    assert set(y_sh.tolist()) <= {0, 1}


def test_multitask_interleave_and_seed():
    a = make_multitask(120, n_tasks=3, n_bits=5, random_state=1)
    b = make_multitask(120, n_tasks=3, n_bits=5, random_state=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    X, y, task = make_multitask(120, n_tasks=3, n_bits=5, interleave=True, random_state=1)
    assert not np.all(np.diff(task) >= 0)  # rows shuffled
    bits = X[:, 3:].reshape(120, 5, 3)  # column j * n_tasks + t
    for t in range(3):
        m = task == t
        assert np.all(np.abs(bits[m, :, t]) == 1)
    # same multiset of (task, label) as the ordered version
    assert sorted(zip(task, y)) == sorted(zip(a[2], a[1]))
    with pytest.raises(ValueError, match="k=7"):
        make_multitask(10, n_bits=5, k=7)
    with pytest.raises(ValueError, match="labels"):
        make_multitask(10, labels="nope")


def test_hierarchy_and_tree_distance():
    X, y, D = make_hierarchy(180, branching=(3, 3), n_features=10, random_state=0)
    assert X.shape == (180, 10) and D.shape == (9, 9)
    assert np.bincount(y).tolist() == [20] * 9
    np.testing.assert_array_equal(D, D.T)
    assert np.all(np.diag(D) == 0)
    assert sorted(set(D[0].tolist())) == [0, 2, 4]
    assert (D[0] == 2).sum() == 2  # two siblings
    # siblings' class means are closer than cousins'
    means = np.array([X[y == c].mean(0) for c in range(9)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[D == 2].mean() < dist[D == 4].mean()
    X3, y3, D3 = make_hierarchy(80, branching=(2, 2, 2), scales=(3, 2, 1), random_state=0)
    assert D3.max() == 6 and len(np.unique(y3)) == 8
    with pytest.raises(ValueError, match="scales"):
        make_hierarchy(10, branching=(2, 2), scales=(1.0,))
    np.testing.assert_array_equal(tree_distance([(0, 0), (0, 1), (1, 2)]),
                                  [[0, 2, 4], [2, 0, 4], [4, 4, 0]])


def test_digit_groups_distance():
    D = digit_groups_distance()
    assert D.shape == (10, 10)
    for members in DIGIT_GROUPS.values():
        for a in members:
            for b in members:
                assert D[a, b] == (0 if a == b else 2)
    assert D[0, 1] == 4
    with pytest.raises(ValueError, match="ungrouped"):
        digit_groups_distance({"a": (0, 1)})


def test_multitask_subspaces_structure():
    X, y, task = make_multitask_subspaces(300, n_tasks=3, n_features=24, rank=3, random_state=0)
    assert X.shape == (300, 24) and X.dtype == np.float32 and y.dtype == np.int64
    counts = np.bincount(task)
    assert counts.tolist() == [134, 100, 66]  # unequal shares 4 : 3 : 2
    assert np.all(y // 2 == task)  # each task has its own pair of classes
    assert 0.3 < np.mean(y % 2) < 0.7
    # rows of different tasks are orthogonal (disjoint subspaces), of the same task are not
    G = X.astype(float) @ X.T.astype(float)
    same = task[:, None] == task[None, :]
    assert np.abs(G[~same]).max() < 1e-5
    assert np.abs(G[same]).mean() > 0.5
    # each task spans exactly `rank` dimensions; the tasks' rows are shuffled
    for t in range(3):
        assert np.linalg.matrix_rank(X[task == t], tol=1e-4) == 3
    assert not np.all(np.diff(task) >= 0)
    # dense features: no column is specific to one task
    assert np.all((np.abs(X) > 1e-6).mean(0) > 0.9)


def test_multitask_subspaces_seed_noise_and_bad_input():
    a = make_multitask_subspaces(90, random_state=3)
    b = make_multitask_subspaces(90, random_state=3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    X, y, task = make_multitask_subspaces(90, proportions=[1, 1, 1], noise=0.1, random_state=0)
    assert np.bincount(task).tolist() == [30, 30, 30]
    G = X @ X.T
    assert np.abs(G[task[:, None] != task[None, :]]).max() > 1e-3  # noise couples the tasks
    with pytest.raises(ValueError, match="do not fit"):
        make_multitask_subspaces(10, n_tasks=4, n_features=8, rank=3)
    with pytest.raises(ValueError, match="rank"):
        make_multitask_subspaces(10, rank=1)
    with pytest.raises(ValueError, match="proportions"):
        make_multitask_subspaces(10, proportions=[1, 2])
    with pytest.raises(ValueError, match="noise"):
        make_multitask_subspaces(10, noise=-1.0)
