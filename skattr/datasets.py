"""Small seeded datasets: digits as images, label noise, a synthetic multitask problem and a
synthetic label hierarchy.  Everything is generated locally (sklearn's digits ship with
scikit-learn): no download.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_random_state

__all__ = [
    "load_digits_images",
    "flip_labels",
    "make_multitask",
    "make_multitask_subspaces",
    "make_hierarchy",
    "tree_distance",
    "DIGIT_GROUPS",
    "digit_groups_distance",
]

#: A visual grouping of the ten digits by stroke shape (an a-priori choice, not learned):
#: closed loops, mostly straight strokes, open curves.
DIGIT_GROUPS = {"loops": (0, 6, 8, 9), "straight": (1, 4, 7), "curves": (2, 3, 5)}


def load_digits_images(as_images=True, *, n_class=10):
    """sklearn's 8x8 digits as float32 in [0, 1].

    Parameters
    ----------
    as_images : bool, default=True
        ``(n, 1, 8, 8)`` images when True, ``(n, 64)`` vectors when False.
    n_class : int, default=10
        Keep the digits ``0 .. n_class - 1``.

    Returns
    -------
    X : ndarray of float32, shape (n, 1, 8, 8) or (n, 64)
    y : ndarray of int64, shape (n,)

    Examples
    --------
    >>> from skattr.datasets import load_digits_images
    >>> X, y = load_digits_images()
    >>> X.shape, X.dtype, float(X.max())
    ((1797, 1, 8, 8), dtype('float32'), 1.0)
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(n_class=n_class, return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if as_images:
        X = X.reshape(-1, 1, 8, 8)
    return X, y.astype(np.int64)


def flip_labels(y, fraction=0.1, random_state=None, *, classes=None):
    """Replace the labels of a random ``fraction`` of the samples by another class.

    Exactly ``round(fraction * n)`` samples are flipped, each to a class drawn uniformly among
    the *other* classes.

    Parameters
    ----------
    y : array-like of shape (n,)
    fraction : float in [0, 1], default=0.1
    random_state : int, RandomState instance or None
    classes : array-like, default=None
        The label set (default: the classes present in ``y``).

    Returns
    -------
    y_noisy : ndarray of shape (n,)
    flipped : ndarray of bool, shape (n,)

    Examples
    --------
    >>> import numpy as np
    >>> from skattr.datasets import flip_labels
    >>> y_noisy, flipped = flip_labels(np.arange(100) % 10, 0.1, random_state=0)
    >>> int(flipped.sum()), bool(np.all(y_noisy[flipped] != (np.arange(100) % 10)[flipped]))
    (10, True)
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-dimensional, got shape {y.shape}.")
    if not (isinstance(fraction, numbers.Real) and 0 <= fraction <= 1):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}.")
    classes = np.unique(y) if classes is None else np.asarray(classes)
    if len(classes) < 2:
        raise ValueError("Flipping labels needs at least 2 classes.")
    rng = check_random_state(random_state)
    n = y.shape[0]
    k = int(round(fraction * n))
    idx = rng.choice(n, size=k, replace=False)
    y_noisy = y.copy()
    for i in idx:
        others = classes[classes != y[i]]
        y_noisy[i] = others[rng.randint(len(others))]
    flipped = np.zeros(n, dtype=bool)
    flipped[idx] = True
    return y_noisy, flipped


def make_multitask(
    n_samples=1200,
    n_tasks=4,
    n_bits=8,
    *,
    k=2,
    labels="per_task",
    task_indicator=True,
    interleave=False,
    random_state=None,
):
    """Several independent sparse-parity tasks, each on its own block of input bits.

    Sample ``i`` belongs to task ``t``: its block ``t`` of ``n_bits`` inputs holds random
    ±1 bits, every other block is 0, and (with ``task_indicator``) a one-hot task code is
    prepended.  Its label is the parity of ``k`` fixed bits of block ``t`` (a different subset
    per task).  The tasks share no input and no relevant bit: a network learns them with
    parameters that are, to first order, task specific, so the theory of the loss kernel
    predicts a block-diagonal kernel (one block per task).

    Parameters
    ----------
    n_samples : int, default=1200
        Split evenly between tasks (the remainder goes to the first tasks).
    n_tasks : int, default=4
    n_bits : int, default=8
        Bits per task block.
    k : int, default=2
        Parity order (the number of relevant bits per task); ``k=1`` is a copy task.
    labels : {"per_task", "shared"}, default="per_task"
        "per_task": task ``t`` has its own pair of classes, ``y = 2 t + parity`` (so its loss
        depends on its own output rows); "shared": every task answers with the same two
        classes, ``y = parity`` (Michaud et al.'s multitask sparse parity).
    task_indicator : bool, default=True
        Prepend the one-hot task code (``n_tasks`` inputs).
    interleave : bool, default=False
        If False, samples are sorted by task and the blocks are contiguous columns.  If True,
        the samples come in random order and the task blocks' columns are interleaved (bit
        ``j`` of task ``t`` is column ``j * n_tasks + t`` of the bit part), so neither the row
        nor the column order reveals the tasks.
    random_state : int, RandomState instance or None

    Returns
    -------
    X : ndarray of float32, shape (n_samples, n_tasks * (n_bits + task_indicator))
    y : ndarray of int64, shape (n_samples,)
        ``2 * task + parity`` (``labels="per_task"``) or the parity (``labels="shared"``).
    task : ndarray of int64, shape (n_samples,)
        The task of each sample.

    Examples
    --------
    >>> from skattr.datasets import make_multitask
    >>> X, y, task = make_multitask(100, n_tasks=4, n_bits=6, random_state=0)
    >>> X.shape, sorted(set(task.tolist()))
    ((100, 28), [0, 1, 2, 3])
    """
    for name, v, lo in (("n_samples", n_samples, 1), ("n_tasks", n_tasks, 1), ("n_bits", n_bits, 1),
                        ("k", k, 1)):
        if not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if k > n_bits:
        raise ValueError(f"k={k} relevant bits cannot exceed n_bits={n_bits}.")
    if labels not in ("per_task", "shared"):
        raise ValueError(f"labels must be 'per_task' or 'shared', got {labels!r}.")
    rng = check_random_state(random_state)
    subsets = [np.sort(rng.choice(n_bits, size=k, replace=False)) for _ in range(n_tasks)]
    task = np.sort(np.arange(n_samples) % n_tasks)
    bits = rng.randint(0, 2, size=(n_samples, n_bits)) * 2 - 1
    y = np.empty(n_samples, dtype=np.int64)
    for t in range(n_tasks):
        m = task == t
        y[m] = (np.prod(bits[m][:, subsets[t]], axis=1) < 0).astype(np.int64)
        if labels == "per_task":
            y[m] += 2 * t
    Xb = np.zeros((n_samples, n_tasks, n_bits), dtype=np.float32)
    Xb[np.arange(n_samples), task] = bits
    if interleave:
        Xb = Xb.transpose(0, 2, 1)  # (n, n_bits, n_tasks): column j * n_tasks + t
    Xb = Xb.reshape(n_samples, -1)
    parts = [np.eye(n_tasks, dtype=np.float32)[task]] if task_indicator else []
    X = np.hstack(parts + [Xb]).astype(np.float32)
    if interleave:
        order = rng.permutation(n_samples)
        X, y, task = X[order], y[order], task[order]
    return X, y, task.astype(np.int64)


def make_multitask_subspaces(
    n_samples=600,
    n_tasks=3,
    n_features=24,
    rank=3,
    *,
    proportions=None,
    noise=0.0,
    random_state=None,
):
    """Several nonlinear Gaussian tasks, each living in its own random subspace of the inputs.

    A second multitask problem built unlike :func:`make_multitask`: continuous Gaussian inputs
    instead of ±1 bits, *dense* features (every feature is used by every task, so neither the
    columns nor a task code reveal the task), unequal task sizes, and a rule that is not a
    parity.  The input space is split into ``n_tasks`` mutually orthogonal random subspaces
    ``U_t`` (orthonormal ``n_features x rank`` bases from one QR decomposition); a sample of task
    ``t`` is ``x = U_t z + noise * e`` with ``z ~ N(0, I_rank)``, ``e ~ N(0, I)``.  Its label is a
    Gaussian XOR of the first two latent coordinates, ``z_0 z_1 > 0``, in the task's own pair of
    classes (``y = 2 t + [z_0 z_1 > 0]``); the other ``rank - 2`` coordinates are distractors.
    The tasks share no input direction, so (with ``noise=0``) a first-layer weight perturbation
    moves the losses of one task only, and the loss kernel's theory predicts one block per
    task.

    Parameters
    ----------
    n_samples : int, default=600
    n_tasks : int, default=3
    n_features : int, default=24
        Must be at least ``n_tasks * rank``.
    rank : int, default=3
        Dimension of each task's subspace (at least 2).
    proportions : array-like of shape (n_tasks,) or None, default=None
        Share of the samples per task (normalised); None gives unequal shares proportional to
        ``n_tasks + 1, n_tasks, ..., 2`` (e.g. 40%, 33%, 27% for three tasks).
    noise : float, default=0.0
        Standard deviation of isotropic noise added to every input (it couples the tasks).
    random_state : int, RandomState instance or None

    Returns
    -------
    X : ndarray of float32, shape (n_samples, n_features)
    y : ndarray of int64, shape (n_samples,)
        ``2 * task + [z_0 z_1 > 0]``.
    task : ndarray of int64, shape (n_samples,)
        The task of each sample; the rows come in random order.

    Examples
    --------
    >>> from skattr.datasets import make_multitask_subspaces
    >>> X, y, task = make_multitask_subspaces(300, random_state=0)
    >>> X.shape, sorted(set(task.tolist())), sorted(set(y.tolist()))
    ((300, 24), [0, 1, 2], [0, 1, 2, 3, 4, 5])
    """
    for name, v, lo in (("n_samples", n_samples, 1), ("n_tasks", n_tasks, 1),
                        ("n_features", n_features, 1), ("rank", rank, 2)):
        if not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if n_tasks * rank > n_features:
        raise ValueError(
            f"n_tasks * rank = {n_tasks * rank} orthogonal directions do not fit in "
            f"n_features={n_features}."
        )
    if not (isinstance(noise, numbers.Real) and noise >= 0):
        raise ValueError(f"noise must be a non-negative number, got {noise!r}.")
    if proportions is None:
        proportions = np.arange(n_tasks + 1, 1, -1, dtype=float)
    proportions = np.asarray(proportions, dtype=float)
    if proportions.shape != (n_tasks,) or np.any(proportions <= 0):
        raise ValueError(
            f"proportions must be {n_tasks} positive numbers, got {proportions.tolist()}."
        )
    rng = check_random_state(random_state)
    basis, _ = np.linalg.qr(rng.normal(size=(n_features, n_tasks * rank)))
    counts = np.floor(proportions / proportions.sum() * n_samples).astype(int)
    counts[: n_samples - counts.sum()] += 1
    task = np.repeat(np.arange(n_tasks), counts)
    z = rng.normal(size=(n_samples, rank))
    X = np.empty((n_samples, n_features))
    for t in range(n_tasks):
        m = task == t
        X[m] = z[m] @ basis[:, t * rank : (t + 1) * rank].T
    if noise:
        X = X + noise * rng.normal(size=X.shape)
    y = 2 * task + (z[:, 0] * z[:, 1] > 0)
    order = rng.permutation(n_samples)
    return (X[order].astype(np.float32), y[order].astype(np.int64),
            task[order].astype(np.int64))


def tree_distance(paths):
    """Path length in a rooted tree between leaves given by their root-to-leaf ``paths``.

    ``paths[c]`` is the tuple of node indices below the root of leaf ``c`` (all of the same
    depth ``L``); the distance of two leaves is ``2 * (L - depth of their lowest common
    ancestor)`` (0 on the diagonal).
    """
    P = np.asarray(paths)
    L = P.shape[1]
    same = np.cumprod(P[:, None, :] == P[None, :, :], axis=2)  # common prefix indicator
    lca_depth = same.sum(2)
    return (2 * (L - lca_depth)).astype(np.int64)


def make_hierarchy(
    n_samples=900,
    branching=(3, 3),
    n_features=20,
    *,
    scales=(3.0, 1.5),
    noise=1.0,
    random_state=None,
):
    """Classes generated from a tree of super-classes (Gaussian clusters along a tree).

    The root's children get means ``N(0, scales[0]^2 I)``, each deeper node the mean of its
    parent plus ``N(0, scales[level]^2 I)``; the leaves are the classes, and a sample of class
    ``c`` is its leaf mean plus ``N(0, noise^2 I)``.  Sibling classes are thus closer than
    cousins, and the tree distance between classes is returned for comparisons.

    Parameters
    ----------
    n_samples : int, default=900
        Split evenly between classes.
    branching : tuple of int, default=(3, 3)
        Children per node at each level: ``(3, 3)`` is 3 super-classes of 3 classes each.
    n_features : int, default=20
    scales : tuple of float, default=(3.0, 1.5)
        Standard deviation of the mean offsets per level (one per entry of ``branching``).
    noise : float, default=1.0
        Within-class standard deviation.
    random_state : int, RandomState instance or None

    Returns
    -------
    X : ndarray of float32, shape (n_samples, n_features)
    y : ndarray of int64, shape (n_samples,)
        Leaf classes, ``0 .. prod(branching) - 1``, samples sorted by class.
    distance : ndarray of int64, shape (n_classes, n_classes)
        Tree (path-length) distance between classes: 2 for siblings, 4 for cousins, ...

    Examples
    --------
    >>> from skattr.datasets import make_hierarchy
    >>> X, y, D = make_hierarchy(90, branching=(3, 3), random_state=0)
    >>> X.shape, D.shape, D[0].tolist()
    ((90, 20), (9, 9), [0, 2, 2, 4, 4, 4, 4, 4, 4])
    """
    branching = tuple(int(b) for b in branching)
    if not branching or any(b < 1 for b in branching):
        raise ValueError(f"branching must be a non-empty tuple of positive ints, got {branching}.")
    scales = tuple(float(s) for s in scales)
    if len(scales) != len(branching):
        raise ValueError(
            f"scales needs one entry per level of branching ({len(branching)}), got {len(scales)}."
        )
    rng = check_random_state(random_state)
    means = [np.zeros(n_features)]
    paths = [()]
    for level, b in enumerate(branching):
        new_means, new_paths = [], []
        for mu, path in zip(means, paths):
            for _ in range(b):
                new_means.append(mu + scales[level] * rng.normal(size=n_features))
                new_paths.append(path + (len(new_paths),))
        means, paths = new_means, new_paths
    n_classes = len(means)
    y = np.sort(np.arange(n_samples) % n_classes).astype(np.int64)
    X = np.asarray(means)[y] + noise * rng.normal(size=(n_samples, n_features))
    return X.astype(np.float32), y, tree_distance(paths)


def digit_groups_distance(groups=None, n_classes=10):
    """Tree distance between digit classes under a grouping (default :data:`DIGIT_GROUPS`).

    0 on the diagonal, 2 within a group, 4 across groups (a two-level tree).
    """
    groups = DIGIT_GROUPS if groups is None else groups
    g = np.full(n_classes, -1)
    for i, members in enumerate(groups.values()):
        g[list(members)] = i
    if np.any(g < 0):
        raise ValueError(f"groups leave classes {np.flatnonzero(g < 0).tolist()} ungrouped.")
    return tree_distance([(int(g[c]), c) for c in range(n_classes)])
