"""Data order across world sizes: caption files give the same global batches (and the same
augmented pixels) on any number of ranks; a shard epoch continued on another world size or worker
count takes every remaining sample exactly once."""
import json

import numpy as np
import pytest
import torch
from _data_helpers import make_pairs, stand_in_tokenize

from clipforge.data import EpochPlan, make_train_loader, open_dataset, remaining_positions, write_shards
from clipforge.transforms import image_transform

N = 23


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    caption_file, _ = make_pairs(tmp_path_factory.mktemp("elastic"), N)
    return open_dataset(caption_file)


@pytest.mark.parametrize("num_samples, global_batch", [(23, 4), (64, 8), (7, 12), (101, 24)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batches_do_not_depend_on_the_world_size(num_samples, global_batch, drop_last):
    def global_batches(world_size):
        plans = [EpochPlan(num_samples, global_batch // world_size, rank=r, world_size=world_size, seed=1,
                           drop_last=drop_last, global_batches=True) for r in range(world_size)]
        count = max(p.num_batches for p in plans)
        return [np.concatenate([p.batch(b)[0] for p in plans if b < p.num_batches]).tolist() for b in range(count)]

    single = global_batches(1)
    for world_size in (2, 4):
        assert global_batches(world_size) == single
    positions = [p for batch in single for p in batch]
    assert len(positions) == len(set(positions))
    assert len(positions) == (num_samples if not drop_last else num_samples // global_batch * global_batch)


def test_two_ranks_get_the_pixels_of_one_rank_with_random_crops(captions):
    preprocess = image_transform(24, train=True, scale=(0.2, 1.0))
    def loader(rank, world_size, workers):
        return list(make_train_loader(captions, preprocess, stand_in_tokenize, 8 // world_size, epoch=3, seed=5,
                                      rank=rank, world_size=world_size, num_workers=workers))
    single = loader(0, 1, 0)
    ranks = [loader(0, 2, 2), loader(1, 2, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == N // 8
    for b, batch in enumerate(single):
        assert batch.keys == ranks[0][b].keys + ranks[1][b].keys
        assert torch.equal(batch.images, torch.cat([ranks[0][b].images, ranks[1][b].images]))
    crops = single[0].images
    assert not torch.equal(crops, list(make_train_loader(captions, preprocess, stand_in_tokenize, 8, epoch=4,
                                                         seed=5))[0].images), "crops must be random per epoch"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    caption_file, _ = make_pairs(tmp_path_factory.mktemp("elastic_shards"), 60)
    written = write_shards(caption_file, tmp_path_factory.mktemp("elastic_written"), max_count=7)
    return open_dataset(written.pattern)


def _keys(dataset, world_size, workers, batch_size, batches=None, positions=None, start=0):
    """Keys of the first ``batches`` batches (all when None) on every rank."""
    keys = []
    for rank in range(world_size):
        loader = make_train_loader(dataset, lambda image: torch.zeros(1), stand_in_tokenize, batch_size // world_size,
                                   epoch=2, seed=3, rank=rank, world_size=world_size, num_workers=workers,
                                   shuffle_block=8, positions=positions, start_batch=start)
        for batch in loader:
            if batches is not None and batch.index >= batches:
                break
            keys += batch.keys
    return keys


@pytest.mark.parametrize("stages, then", [([(2, 2, 2)], (1, 1)), ([(1, 1, 3)], (2, 2)),
                                          ([(2, 2, 1), (1, 2, 2)], (3, 1))])
def test_shard_epoch_continued_on_another_world_size_repeats_and_skips_nothing(shards, stages, then):
    batch_size = 6
    taken, left = [], np.arange(len(shards))
    for done, (world_size, lanes, batches) in enumerate(stages):
        taken += _keys(shards, world_size, lanes, batch_size, batches,
                       positions=left if done else None)
        left = remaining_positions(len(shards), batch_size, stages[:done + 1], block=8, seed=3, epoch=2)
    world_size, workers = then
    rest = _keys(shards, world_size, workers, batch_size, positions=left)
    seen = taken + rest
    assert len(seen) == len(set(seen)), "a sample was repeated"
    assert len(taken) == sum(b * batch_size for _, _, b in stages)
    every = set(_keys(shards, 1, 0, 1))  # batch 1: the whole epoch
    # drop_last leaves fewer than one global batch per lane out, as an uninterrupted epoch does
    assert set(seen) <= every and len(every) - len(seen) < batch_size * max(workers, 1)


def test_a_remaining_epoch_that_cannot_fill_a_batch_yields_nothing(shards):
    left = remaining_positions(len(shards), 7, [(1, 1, len(shards) // 7)], block=8, seed=3, epoch=2)
    assert len(left) == len(shards) % 7 > 0
    assert _keys(shards, 1, 0, 7, positions=left) == []


def test_train_resumes_a_shard_epoch_on_another_worker_count_without_repeats(shards, tmp_path, monkeypatch):
    from clipforge.train import TrainConfig, apply_overrides, loop, train

    seen: list[list[str]] = []
    real = loop.make_train_loader
    def recording_loader(*args, **kwargs):
        loader = real(*args, **kwargs)
        def batches():
            for batch in loader:
                seen[-1].extend(batch.keys)
                yield batch
        return type("Recording", (), {"__iter__": lambda self: batches(), "num_batches": loader.num_batches})()
    monkeypatch.setattr(loop, "make_train_loader", recording_loader)
    settings = ["model.name=tiny-vit", "device=cpu", "batch_size=6", "data.workers=2", "steps=4",
                "run.checkpoint_every=2", "run.keep=0", "run.progress=false", "optim.warmup_steps=1",
                f"run.run_dir={tmp_path / 'run'}", f"data.train={shards.urls}"]
    seen.append([])
    train(apply_overrides(TrainConfig(), settings[:4] + ["steps=2"] + settings[5:]))
    first = seen[-1]
    seen.append([])
    train(apply_overrides(TrainConfig(), settings[:3] + ["data.workers=0", "steps=10", "run.resume=latest"]
                          + settings[5:]))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["epoch_stages"] == [[1, 2, 2]] and state["epoch"] == 0
    rest = seen[-1][: 6 * 8]  # the remaining 8 full batches of epoch 0 (60 samples, 12 taken)
    assert len(first) == 12 and len(set(first + rest)) == len(first + rest) == 60
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 10
