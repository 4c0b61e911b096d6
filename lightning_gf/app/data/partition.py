"""The paper's two-partition split of a labelled dataset: pretraining and fine-tuning.

Each class's samples are divided between the two partitions in a proportion drawn
from a symmetric Dirichlet (``alpha``): small ``alpha`` gives very different class
frequencies in the two partitions (non-i.i.d., as in federated-learning splits),
large ``alpha`` an even split. Partition 0 pretrains, partition 1 fine-tunes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def two_partition_split(labels: Sequence[int], alpha: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the pretraining and fine-tuning partitions (disjoint, covering all samples).

    Example:
        >>> pre, fine = two_partition_split([0, 0, 0, 0, 1, 1, 1, 1], alpha=0.5, seed=1)
        >>> sorted(pre + fine)
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (small = skewed partitions), got {alpha}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(list(labels))
    pretrain: list[int] = []
    finetune: list[int] = []
    for cls in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        share = rng.dirichlet([alpha, alpha])[0]
        cut = int(round(share * len(idx)))
        pretrain += idx[:cut].tolist()
        finetune += idx[cut:].tolist()
    return sorted(pretrain), sorted(finetune)
