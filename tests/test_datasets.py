from collections import Counter

import pytest

from mlx_lora_api.tuner import datasets
from mlx_lora_api.types import Message, Sample, data_fingerprint, to_records


@pytest.mark.parametrize("n, batch_size, epochs", [(2, 4, 3), (10, 4, 2), (8, 4, 1), (1, 1, 5), (7, 3, 4)])
def test_every_sample_is_seen_exactly_epochs_times(n, batch_size, epochs):
    lengths = [(i * 7) % 11 + 1 for i in range(n)]
    plan = datasets.epoch_plan(lengths, batch_size, epochs, seed=0)
    assert Counter(i for batch in plan for i in batch) == {i: epochs for i in range(n)}
    assert len(plan) == epochs * datasets.batches_per_epoch(n, batch_size)
    per_epoch = len(plan) // epochs
    for e in range(epochs):  # each epoch on its own covers the whole set once
        assert sorted(i for batch in plan[e * per_epoch : (e + 1) * per_epoch] for i in batch) == list(range(n))


@pytest.mark.parametrize("own, rehearsal, batch_size", [(30, 15, 4), (2, 1, 4), (7, 4, 3), (5, 5, 2)])
def test_rehearsal_is_spread_over_every_batch(own, rehearsal, batch_size):
    lengths = [10 + i % 5 for i in range(own)] + [60 + i for i in range(rehearsal)]
    plan = datasets.epoch_plan(lengths, batch_size, 3, seed=0, mixed_from=own)
    assert Counter(i for batch in plan for i in batch) == {i: 3 for i in range(own + rehearsal)}
    assert len(plan) == 3 * datasets.batches_per_epoch(own + rehearsal, batch_size)
    share = rehearsal / (own + rehearsal)
    for batch in plan:  # each batch rehearses about its share, none only rehearses
        assert any(i < own for i in batch)
        assert abs(sum(i >= own for i in batch) - share * len(batch)) <= 1.5


def test_batches_hold_samples_of_similar_length_and_follow_the_seed():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    plan = datasets.epoch_plan(lengths, 2, 3, seed=1)
    assert all(abs(lengths[a] - lengths[b]) <= 2 for a, b in plan)
    assert plan == datasets.epoch_plan(lengths, 2, 3, seed=1)
    assert plan != datasets.epoch_plan(lengths, 2, 3, seed=2)


def test_collate_pads_like_mlx_lm_and_truncates():
    tokens, lengths = datasets.collate([([1, 2, 3], 0), ([4] * 40, 1)], max_seq_length=2048)
    assert tokens.shape == (2, 41)  # one plus a multiple of 8
    assert lengths.tolist() == [[0, 3], [1, 40]]
    tokens, lengths = datasets.collate([([9] * 100, 0)], max_seq_length=20)
    assert tokens.shape == (1, 20) and lengths.tolist() == [[0, 20]]


def test_request_samples_become_mlx_lm_records():
    samples = ["plain", Sample(prompt="p", completion="c"), Sample(messages=[Message("user", "hi")])]
    assert to_records(samples) == [
        {"text": "plain"},
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    assert data_fingerprint(["a", "b"]) != data_fingerprint(["b", "a"])


def test_validation_batches_are_walked_once_in_order():
    dataset = [([i] * (i + 1), 0) for i in range(5)]
    iterate = datasets.make_iterate_batches(plan=[[0]])
    batches = list(iterate(dataset, batch_size=2, max_seq_length=64))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
