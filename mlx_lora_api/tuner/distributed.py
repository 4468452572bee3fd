"""Data-parallel training over MLX's distributed group (jobs/rank.py starts the ranks).

Every rank holds the whole data set and the same plan of global batches; each trains on its share
of every batch (`shares`: rows rank, rank + N, ...), so the batches, the samples seen, the epochs
and the data order are one rank's. mlx-lm's step averages the ranks' gradients; `weighted` scales
each rank's loss by its share of the batch's tokens (of its pairs, for preference losses), so
that the average is one rank's gradient of the whole batch, also where shares are uneven. A rank
whose share of a batch is empty (a last batch smaller than the ranks) runs a row of it with
weight 0, so that it still meets the others in the collective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx


def shares(plan: Sequence[Sequence[int]], rank: int, size: int) -> tuple[list[list[int]], list[float]]:
    """This rank's rows of each global batch in `plan`, and 1.0, or 0.0 where it has none (then it
    runs the batch's first row, weighted 0)."""
    mine = [list(batch[rank::size]) for batch in plan]
    return [rows or [batch[0]] for rows, batch in zip(mine, plan)], [1.0 if rows else 0.0 for rows in mine]


def with_weights(batches: Iterator[tuple], weights: Sequence[float]) -> Iterator[tuple]:
    """Each batch with its weight as a last element (what `weighted` losses take)."""
    for batch, weight in zip(batches, weights):
        yield (*batch, mx.array(weight))


def weighted(loss, size: int, pairs: bool = False):
    """`loss(model, *batch, weight)` for data-parallel steps: this rank's loss times its share of the
    global batch's tokens (`pairs`: rows; a batch of preference pairs is chosen then rejected rows)
    times `size`, whose average over the ranks is the whole batch's loss. The token count comes
    back as this rank's real tokens; a preference loss's metrics come back as this rank's part of
    the batch's (summed over the ranks, they are the batch's)."""

    def wrapped(model, *weighted_batch):
        *batch, weight = weighted_batch
        value, count, *rest = loss(model, *batch)
        mine = weight * (batch[-2].shape[0] // 2 if pairs else count)
        total = mx.stop_gradient(mx.distributed.all_sum(mine, stream=mx.cpu))
        part = mine / mx.maximum(total, 1)
        return (value * part * size, (count * weight).astype(count.dtype), *[metric * part for metric in rest])

    return wrapped
