"""Shards at scale: resampled epochs, weighted mixing of sources, http(s) and pipe: shard URLs
(a real http.server on 127.0.0.1), each with exact mid-epoch resume."""
import collections
import functools
import http.server
import threading

import pytest
import torch
from _data_helpers import StandInPreprocess, make_pairs, stand_in_tokenize

from clipforge.data import make_train_loader, open_dataset, write_shards
from clipforge.train import TrainConfig, apply_overrides, validate

pytestmark = pytest.mark.slow  # trains and serves shards over HTTP: left out of -m 'not slow'


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source a: 4 shards of 6 samples; source b: 3 shards of 6 samples."""
    patterns = []
    for name, count in (("a", 24), ("b", 18)):
        caption_file, _ = make_pairs(tmp_path_factory.mktemp(f"src_{name}"), count)
        written = write_shards(caption_file, tmp_path_factory.mktemp(f"shards_{name}"), max_count=6, prefix=name)
        patterns.append(written.pattern)
    return patterns


def _keys(dataset, epoch, **kwargs):
    loader = make_train_loader(dataset, StandInPreprocess(), stand_in_tokenize, kwargs.pop("batch_size", 4),
                               epoch=epoch, seed=2, drop_last=False, **kwargs)
    return [batch for batch in loader]


def _assert_resume_exact(dataset, **kwargs):
    full = _keys(dataset, 3, **kwargs)
    resumed = _keys(dataset, 3, start_batch=2, **kwargs)
    assert len(full) > 3
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


def test_resampled_epochs_draw_shards_with_replacement(two_sources):
    dataset = open_dataset(two_sources[0], resampled=True)
    views = [dataset.epoch_view(epoch, 2) for epoch in range(6)]
    assert all(len(view.order) == 4 for view in views)
    assert any(len(set(view.order.tolist())) < 4 for view in views), "some epoch repeats a shard"
    assert len({tuple(view.order.tolist()) for view in views}) > 1
    keys = [k for batch in _keys(dataset, 1) for k in batch.keys]
    assert len(keys) == len(views[1])  # the epoch holds the drawn shards' samples, repeats included
    _assert_resume_exact(dataset, num_workers=2)


def test_weighted_sources_give_each_its_share(two_sources):
    dataset = open_dataset(two_sources, resampled=True, weights=[9, 1])
    drawn = collections.Counter()
    for epoch in range(40):
        for shard in dataset.epoch_view(epoch, 2).order:
            drawn["a" if "/a-" in dataset.paths[shard] else "b"] += 1
    assert 0.8 < drawn["a"] / sum(drawn.values()) < 0.97  # 9 : 1 (a has 4 shards, b has 3)
    even = open_dataset(two_sources, resampled=True)  # no weights: every shard alike
    assert pytest.approx(even.shard_weights.tolist()) == [1 / 7] * 7
    _assert_resume_exact(dataset, num_workers=0)


def test_weights_without_resampling_and_bad_weights_are_refused(two_sources, tmp_path):
    with pytest.raises(ValueError, match="needs data.resampled=true"):
        open_dataset(two_sources, weights=[1, 1])
    with pytest.raises(ValueError, match="2 values for 3 sources|one per source"):
        open_dataset(two_sources + two_sources[:1], weights=[1, 1], resampled=True)
    base = ["data.sources=" + ",".join(two_sources), "data.weights=3,1"]
    with pytest.raises(ValueError, match="needs data.resampled=true"):
        validate(apply_overrides(TrainConfig(), base))
    validate(apply_overrides(TrainConfig(), base + ["data.resampled=true"]))
    with pytest.raises(ValueError, match="not both"):
        validate(apply_overrides(TrainConfig(), base + ["data.resampled=true", "data.train=x.csv"]))


@pytest.fixture(scope="module")
def http_root(two_sources):
    folder = two_sources[0].rsplit("/", 1)[0]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_shards_read_like_local_ones(two_sources, http_root):
    local = open_dataset(two_sources[0])
    name = two_sources[0].rsplit("/", 1)[1]
    remote = open_dataset(f"{http_root}/{name}")
    assert len(remote) == len(local) == 24 and remote.sizes.tolist() == local.sizes.tolist()
    for a, b in zip(_keys(local, 1, num_workers=2), _keys(remote, 1, num_workers=2), strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images)
    _assert_resume_exact(remote, num_workers=2)


def test_pipe_shards_read_like_local_ones(two_sources):
    local = open_dataset(two_sources[0])
    remote = open_dataset(f"pipe:cat {two_sources[0]}")
    assert len(remote) == len(local)
    assert ([k for b in _keys(local, 1) for k in b.keys] == [k for b in _keys(remote, 1) for k in b.keys])
    _assert_resume_exact(remote, num_workers=0)
