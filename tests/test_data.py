"""Digits splits and data-parallel sharding."""
from __future__ import annotations

import torch

from kd_platform.config.recipe import Recipe
from kd_platform.data import build_data
from kd_platform.data.digits import load_digits_arrays
from kd_platform.data.split import shard, stratified_split


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_stratified_split_is_seeded_and_proportional():
    y = torch.arange(10).repeat_interleave(torch.tensor([50, 60, 70, 80, 90, 100, 110, 120, 130, 140]))
    kept, held = stratified_split(y, 0.1, seed=4)
    assert len(set(kept.tolist()) & set(held.tolist())) == 0 and len(kept) + len(held) == len(y)
    counts = torch.bincount(y[held], minlength=10)
    assert counts.tolist() == [round(0.1 * n) for n in (50, 60, 70, 80, 90, 100, 110, 120, 130, 140)]
    again, _ = stratified_split(y, 0.1, seed=4)
    other, _ = stratified_split(y, 0.1, seed=5)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_digits_splits_are_disjoint_and_test_is_fixed():
    images, _ = load_digits_arrays()
    a = build_data(Recipe(), seed=0, device=torch.device("cpu"))
    b = build_data(Recipe(), seed=1, device=torch.device("cpu"))
    assert a.path == "device"
    train, val, test = (set(a.splits[k].indices.tolist()) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train) + len(val) + len(test) == len(images)
    assert torch.equal(a.splits["test"].indices, b.splits["test"].indices)  # the test split never moves
    assert not torch.equal(a.splits["val"].indices, b.splits["val"].indices)  # validation follows the seed
    # Different images, not just different positions: what the splits yield never overlaps.
    x_train, x_val = (torch.cat([x for x, _ in a.eval_batches(k)]) for k in ("train", "val"))
    assert not (_rows(x_val) & _rows(x_train))


def test_digits_images_are_the_raw_values_normalised_exactly():
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)
    d = build_data(Recipe(), seed=0, device=torch.device("cpu"))
    x = torch.cat([x for x, _ in d.eval_batches("test")])
    assert torch.equal(x, (raw[d.splits["test"].indices] / 16.0 - 0.5) / 0.5)


def test_two_workers_see_disjoint_equal_halves_of_an_epoch():
    recipe = Recipe(augment="none", batch_size=64)
    full = build_data(recipe, seed=0, device=torch.device("cpu"))
    halves = [build_data(recipe, seed=0, device=torch.device("cpu"), rank=r, world=2) for r in (0, 1)]
    seen = [torch.cat([b.x for b in h.train_batches(epoch=3, num_views=1)]) for h in halves]
    assert len(seen[0]) == len(seen[1]) == len(full.splits["train"]) // 2
    assert not (_rows(seen[0]) & _rows(seen[1]))
    assert halves[0].steps_per_epoch() == halves[1].steps_per_epoch()
    assert halves[0].batch_size == 32  # the global batch is split across workers


def test_shard_drops_only_the_remainder():
    idx = torch.arange(11)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(9))


def test_epoch_stream_is_reproducible_and_views_differ():
    d = build_data(Recipe(), seed=0, device=torch.device("cpu"))
    first = next(d.train_batches(epoch=2, num_views=2))
    again = next(d.train_batches(epoch=2, num_views=2))
    assert torch.equal(first.view(0), again.view(0)) and torch.equal(first.y, again.y)
    assert not torch.equal(first.view(0), first.view(1))  # independent augmentation per view
