"""One epoch of training data: every sample exactly once across ranks and workers, deterministic
batches, exact mid-epoch resume, and bad samples skipped, logged and bounded."""
import itertools
import logging

import numpy as np
import pytest
import torch
from _data_helpers import (StandInPreprocess, make_images, make_pairs, stand_in_tokenize, write_bad_images,
                           write_caption_file)

from clipforge.data import EpochPlan, TooManyBadSamples, make_train_loader, open_dataset, write_shards

N = 23  # prime: no batch size, rank or worker count divides it


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    caption_file, names = make_pairs(tmp_path_factory.mktemp("epoch"), N)
    return open_dataset(caption_file), set(names)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, captions):
    dataset, _ = captions
    written = write_shards(dataset.caption_file, tmp_path_factory.mktemp("epoch_shards"), max_count=5)
    dataset = open_dataset(written.pattern)
    keys = {raw.key for raw in dataset.epoch_view(0, 0).read(0, len(dataset))}
    return dataset, keys


def _loader(dataset, **kwargs):
    return make_train_loader(dataset, StandInPreprocess(), stand_in_tokenize, kwargs.pop("batch_size", 4), **kwargs)


def _epoch_keys(dataset, world_size, num_workers, epoch=0, drop_last=False, batch_size=4):
    per_rank = []
    for rank in range(world_size):
        loader = _loader(dataset, batch_size=batch_size, epoch=epoch, rank=rank, world_size=world_size,
                         num_workers=num_workers, drop_last=drop_last)
        batches = list(loader)
        assert [b.index for b in batches] == list(range(loader.num_batches))
        per_rank.append([key for b in batches for key in b.keys])
    return per_rank


@pytest.mark.parametrize("source", ["captions", "shards"])
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_sample_is_seen_exactly_once_per_epoch(request, source, world_size, num_workers):
    dataset, all_keys = request.getfixturevalue(source)
    per_rank = _epoch_keys(dataset, world_size, num_workers, epoch=1)
    seen = [key for keys in per_rank for key in keys]
    assert len(seen) == len(all_keys) == N and set(seen) == all_keys


@pytest.mark.parametrize("source", ["captions", "shards"])
def test_drop_last_gives_full_batches_and_equal_counts_on_every_rank(request, source):
    dataset, all_keys = request.getfixturevalue(source)
    loaders = [_loader(dataset, batch_size=3, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert loaders[0].num_batches == loaders[1].num_batches > 0
    batches = [b for loader in loaders for b in loader]
    assert all(len(b) == 3 for b in batches)
    seen = [k for b in batches for k in b.keys]
    assert len(seen) == len(set(seen)) and set(seen) <= all_keys


@pytest.mark.parametrize("source", ["captions", "shards"])
def test_order_changes_with_epoch_and_repeats_with_seed(request, source):
    dataset, _ = request.getfixturevalue(source)
    epoch0 = _epoch_keys(dataset, 1, 0, epoch=0)[0]
    assert epoch0 == _epoch_keys(dataset, 1, 0, epoch=0)[0]
    assert epoch0 != _epoch_keys(dataset, 1, 0, epoch=1)[0]


def test_caption_file_batches_do_not_depend_on_num_workers(captions):
    dataset, _ = captions
    one = list(_loader(dataset, epoch=2, num_workers=0, drop_last=False))
    two = list(_loader(dataset, epoch=2, num_workers=2, drop_last=False))
    for a, b in zip(one, two, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("source, num_workers", [("captions", 2), ("shards", 2), ("shards", 0)])
def test_resume_mid_epoch_yields_the_same_remaining_batches(request, source, num_workers):
    dataset, _ = request.getfixturevalue(source)
    common = dict(batch_size=3, epoch=4, seed=7, rank=1, world_size=2, num_workers=num_workers, drop_last=False)
    full = list(_loader(dataset, **common))
    for start in (1, 3):
        resumed = list(_loader(dataset, start_batch=start, **common))
        assert [b.index for b in resumed] == list(range(start, len(full)))
        for a, b in zip(full[start:], resumed, strict=True):
            assert a.keys == b.keys
            assert torch.equal(a.images, b.images)  # same augmentation draws, not just the same files
            assert torch.equal(a.tokens, b.tokens)


def test_resume_with_the_real_train_transform(captions):
    from clipforge.transforms import image_transform

    dataset, _ = captions
    preprocess = image_transform(24, train=True, scale=(0.3, 1.0))
    def run(start):
        return list(make_train_loader(dataset, preprocess, stand_in_tokenize, 4, epoch=1, num_workers=2,
                                      start_batch=start))
    full, resumed = run(0), run(2)
    assert full[0].images.shape == (4, 3, 24, 24)
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a.images, b.images)


def test_iterating_leaves_the_global_rngs_untouched(captions):
    dataset, _ = captions
    torch.manual_seed(123)
    np.random.seed(5)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(5)
    list(_loader(dataset, num_workers=0))
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_numpy)


@pytest.mark.parametrize("num_samples, batch_size, world_size, lanes, block",
                         list(itertools.product([1, 7, 23, 64, 101], [1, 3, 8], [1, 2, 3], [1, 2, 4], [0, 16])))
def test_plan_partitions_the_epoch_exactly(num_samples, batch_size, world_size, lanes, block):
    seen = []
    for rank in range(world_size):
        plan = EpochPlan(num_samples, batch_size, rank=rank, world_size=world_size, lanes=lanes, block=block,
                         drop_last=False, seed=3, epoch=1)
        for index in range(plan.num_batches):
            positions, (start, stop) = plan.batch(index)
            assert 0 < len(positions) <= batch_size and all(start <= p < stop for p in positions)
            seen += positions.tolist()
    assert sorted(seen) == list(range(num_samples))
    kept = [EpochPlan(num_samples, batch_size, rank=r, world_size=world_size, lanes=lanes, block=block,
                      drop_last=True) for r in range(world_size)]
    assert len({plan.num_batches for plan in kept}) == 1
    full = [p for plan in kept for i in range(plan.num_batches) for p in plan.batch(i)[0].tolist()]
    assert len(full) == len(set(full)) == kept[0].num_batches * batch_size * world_size


# Bad samples: skipped, counted, logged with their key; too many stop the run.

@pytest.fixture(scope="module")
def with_bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    names = make_images(root, 16)
    bad = write_bad_images(root)
    rows = [(n, f"good {i}") for i, n in enumerate(names)] + [(n, "broken") for n in bad] + [(names[0], "")]
    return open_dataset(write_caption_file(root / "c.csv", rows)), set(bad) | {names[0]}


def test_bad_samples_are_skipped_counted_and_logged_with_their_key(with_bad, caplog):
    dataset, bad_keys = with_bad
    loader = _loader(dataset, batch_size=4, num_workers=2, drop_last=False, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        batches = list(loader)
    skipped = [s for b in batches for s in b.skipped]
    assert len(skipped) == 5 and loader.skips.skipped == 5 and loader.skips.seen == len(dataset) == 21
    assert {key for key, _ in skipped} == bad_keys
    reasons = " ".join(reason for _, reason in skipped)
    assert "cannot decode image" in reasons and "not an image" in reasons and "cannot read image file" in reasons and "no caption" in reasons
    for key, _ in skipped:
        assert f"skipped sample {key}" in caplog.text
    assert sum(len(b) for b in batches) == 16  # smaller batches, every good sample still there
    assert all(b.images.shape[0] == len(b) == b.tokens.shape[0] for b in batches if len(b))


def test_resume_is_exact_with_bad_samples_too(with_bad):
    dataset, _ = with_bad
    common = dict(batch_size=4, epoch=1, num_workers=2, drop_last=False, max_skip_fraction=0.5)
    full, resumed = list(_loader(dataset, **common)), list(_loader(dataset, start_batch=2, **common))
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.keys == b.keys and a.skipped == b.skipped and torch.equal(a.images, b.images)


def test_skip_rate_above_the_limit_stops_with_counts_and_keys(with_bad):
    dataset, bad_keys = with_bad
    loader = _loader(dataset, batch_size=4, drop_last=False)  # default limit 1%
    with pytest.raises(TooManyBadSamples, match=r"skipped 5 of 21 samples \(23.81%\), above the limit of 1.00%") as err:
        list(loader)
    assert {key for key, _ in err.value.last_bad} <= bad_keys
    early = _loader(dataset, batch_size=4, drop_last=False, max_skip_fraction=0.01, min_seen=4)
    with pytest.raises(TooManyBadSamples):
        next(b for b in early if b.skipped)  # judged as soon as min_seen samples were seen


# Configuration errors of the loader itself.

def test_too_few_samples_for_one_batch_and_bad_start_batch_fail(captions):
    dataset, _ = captions
    with pytest.raises(ValueError, match="too few samples for one batch of 16 per rank on 2 rank"):
        _loader(dataset, batch_size=16, world_size=2)
    with pytest.raises(ValueError, match="start_batch must be in"):
        _loader(dataset, start_batch=99)
    with pytest.raises(ValueError, match="rank must be in"):
        _loader(dataset, rank=2, world_size=2)
