"""Deterministic stratified train/test splitting, shared by the offline dataset builders."""

from collections.abc import Callable

import numpy as np


def stratified_split(
    labels: np.ndarray,
    num_test: Callable[[int], int],
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train and test, class by class, reproducibly.

    Within each class the indices are permuted by `np.random.default_rng([seed, class_id])`
    and the first `num_test(class_count)` of the permutation go to test. The result depends
    only on `labels` and `seed`, never on global random state.

    Args:
      labels: integer array (N,) of class labels.
      num_test: maps the number of examples of a class to how many of them go to test
        (e.g. `lambda n: 50` or `lambda n: round(0.1 * n)`); must lie in [0, n].
      seed: integer seed of the split.

    Returns:
      `(train_indices, test_indices)`: sorted int64 arrays, disjoint, whose union is
      `arange(N)`.
    """
    labels = np.asarray(labels)
    train, test = [], []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        n_test = num_test(len(members))
        if not 0 <= n_test <= len(members):
            raise ValueError(f"num_test gave {n_test} for a class of {len(members)} examples")
        order = np.random.default_rng([seed, int(class_id)]).permutation(members)
        test.append(order[:n_test])
        train.append(order[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
