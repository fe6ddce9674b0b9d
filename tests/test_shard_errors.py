"""Tar shard input that cannot be read stops with one line naming the shard (a damaged file, a
failing ``pipe:`` command with its exit status, an unreachable or 404 URL); shards damaged mid-run
are skipped with their URL and status; ``data.weights`` gives each source its share of samples
whatever its shard sizes; counting shards that no sizes.json lists shows progress on stderr.

Real tar shards of real photos (``write_shards``), real shell commands, a real http.server on 127.0.0.1.
"""
import functools
import http.server
import json
import shutil
import socket
import tarfile
import threading
import warnings

import numpy as np
import pytest
import torch
from _data_helpers import StandInPreprocess, make_pairs, stand_in_tokenize

from clipforge.cli import main
from clipforge.data import ShardDataset, TooManyBadSamples, make_train_loader, open_dataset, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 4 real images each, with their sizes.json."""
    root = tmp_path_factory.mktemp("wds")
    caption_file, _ = make_pairs(root, 12)
    return write_shards(caption_file, root / "shards", max_count=4)


def _copy(shards, folder, sizes=True):
    """The shards copied into ``folder`` (with their sizes.json when ``sizes``); returns the folder."""
    folder.mkdir(parents=True)
    for path in shards.paths:
        shutil.copy(path, folder)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({f"data-{i:06d}.tar": 4 for i in range(3)}))
    return folder


def _truncate(path):
    """Cut ``path`` in the middle of its largest member's data (tarfile reads a cut between or inside
    headers as the end of a shorter tar)."""
    with tarfile.open(path) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])


PATTERN = "data-{000000..000002}.tar"


@pytest.fixture(scope="module")
def served(shards, tmp_path_factory):
    """An http.server on 127.0.0.1 over folders: good/ (with sizes.json), nosizes/, trunc/ (shard 1
    cut in half, listed), gone/ (shard 1 missing, listed) and first404/ (shard 0 missing, listed)."""
    www = tmp_path_factory.mktemp("www")
    for name in ("good", "trunc", "gone", "first404"):
        _copy(shards, www / name)
    _copy(shards, www / "nosizes", sizes=False)
    _truncate(www / "trunc" / "data-000001.tar")
    (www / "gone" / "data-000001.tar").unlink()
    (www / "first404" / "data-000000.tar").unlink()
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _error(data, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        ShardDataset(data, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Start-up: one line naming the shard and what is wrong with it.

@pytest.mark.parametrize("damage, problem", [
    ("truncated, not listed", "damaged or not a tar file: unexpected end of data"),
    ("cut between samples, not listed", "no end-of-archive block after its last member"),
    ("garbage after a sample, not listed", "no end-of-archive block after its last member"),
    ("empty file, not listed", "damaged or not a tar file: empty file"),
    ("empty file, listed", "damaged or not a tar file: empty file"),
    ("no samples, listed", "holds no samples, but the sizes.json beside it lists 4"),
])
def test_unreadable_local_shard_fails_in_one_line_naming_it(shards, tmp_path, damage, problem):
    folder = _copy(shards, tmp_path / "s", sizes=damage.endswith(", listed"))
    first = folder / "data-000000.tar"
    if damage.startswith("truncated"):
        _truncate(first)
    elif damage.startswith(("cut between", "garbage")):  # tarfile alone reads either as a 2-sample tar
        with tarfile.open(first) as tar:
            third = [m for m in tar.getmembers() if m.isreg()][4]  # 2 members a sample: the third's header
        kept = first.read_bytes()[: third.offset]
        first.write_bytes(kept + (b"x" * 1024 if damage.startswith("garbage") else b""))
        with tarfile.open(first) as tar:
            assert len(tar.getmembers()) == 4
    elif damage.startswith("empty file"):
        first.write_bytes(b"")
    else:
        tarfile.open(first, "w").close()  # a valid tar holding nothing
    message = _error(str(folder / PATTERN))
    assert message.startswith(f"shard {first}: ") and problem in message


@pytest.mark.parametrize("command, problem", [
    ("false", "the command exited with status 1"),
    ("cat {missing}", "the command exited with status 1 (cat: {missing}: No such file or directory)"),
    ("cat {shard}; exit 3", "the command exited with status 3"),  # its whole output was a good shard
    ("echo not a tar", "its output: damaged or not a tar file"),
    ("head -c 3000 {shard}", "its output: damaged or not a tar file: unexpected end of data (exit status 0)"),
])
def test_failing_pipe_command_names_its_exit_status_and_stderr(shards, tmp_path, command, problem):
    names = {"missing": str(tmp_path / "nomatch-0.tar"), "shard": shards.paths[0]}
    url = "pipe:" + command.format(**names)
    message = _error(url)
    assert message.startswith(f"shard {url}: {problem.format(**names)}")
    assert "expected a command writing a tar file to stdout" in message


def test_a_long_stderr_is_cut_to_its_last_words():
    message = _error("pipe:seq 1 5000 >&2; exit 2")
    assert "the command exited with status 2 (..." in message and "4999 5000)" in message
    assert len(message) < 450


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_and_missing_urls_fail_naming_the_url(served):
    url = f"http://127.0.0.1:{_closed_port()}/shards/data-000000.tar"
    assert _error(url.replace("000000", "{000000..000003}")).startswith(
        f"shard {url}: cannot reach the server: Connection refused")
    missing = f"{served}/first404/data-000000.tar"  # listed in sizes.json: the first-sample check reads it
    assert _error(f"{served}/first404/{PATTERN}").startswith(f"shard {missing}: HTTP 404 File not found")
    unlisted = f"{served}/nowhere/data-000000.tar"  # no sizes.json: counting reads it
    assert _error(f"{served}/nowhere/{PATTERN}").startswith(f"shard {unlisted}: HTTP 404 File not found")


@pytest.mark.parametrize("case", ["truncated file", "pipe:false", "closed port"])
def test_cli_prints_one_error_line_and_exit_2(shards, tmp_path, capsys, case):
    if case == "truncated file":
        data = str(_copy(shards, tmp_path / "s", sizes=False) / PATTERN)
        _truncate(tmp_path / "s" / "data-000001.tar")
    else:
        data = "pipe:false" if case == "pipe:false" else f"http://127.0.0.1:{_closed_port()}/{PATTERN}"
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--run-dir", str(run_dir), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip("\n").splitlines()[-1].startswith("clipforge train: error: shard ")
    assert not run_dir.exists()


# Mid-run: shards listed in sizes.json but damaged are skipped, their reasons name URL and status.

def _reasons(dataset) -> list[str]:
    return [raw.error for raw in dataset.epoch_view(0, 0).read(0, len(dataset)) if raw.error]


def test_damaged_shards_mid_run_are_skipped_naming_url_and_status(shards, served, tmp_path):
    reasons = _reasons(ShardDataset(f"{served}/trunc/{PATTERN}"))
    assert reasons and all(r.startswith(f"unreadable shard {served}/trunc/data-000001.tar: damaged or not a tar "
                                        "file: unexpected end of data (HTTP 200)") for r in reasons)
    reasons = _reasons(ShardDataset(f"{served}/gone/{PATTERN}"))
    assert reasons == [f"unreadable shard {served}/gone/data-000001.tar: HTTP 404 File not found"] * 4
    local = _copy(shards, tmp_path / "s")
    _truncate(local / "data-000002.tar")
    reasons = _reasons(ShardDataset(str(local / PATTERN)))
    assert reasons and all(" @ <" not in r and str(local / "data-000002.tar") in r for r in reasons)
    loader = make_train_loader(ShardDataset(f"{served}/gone/{PATTERN}"), StandInPreprocess(), stand_in_tokenize,
                               4, min_seen=4)
    with pytest.raises(TooManyBadSamples, match="HTTP 404"):  # 4 of 12 bad: above the 1% limit
        list(loader)


# Weighted sources: the share of samples, not of shards.

@pytest.fixture(scope="module")
def uneven_sources(tmp_path_factory):
    """Source "big": 2 shards of 12 samples; source "small": 6 shards of 4 samples."""
    patterns = []
    for name, max_count in (("big", 12), ("small", 4)):
        caption_file, _ = make_pairs(tmp_path_factory.mktemp(f"src_{name}"), 24)
        patterns.append(write_shards(caption_file, tmp_path_factory.mktemp(name), max_count=max_count,
                                     prefix=name).pattern)
    return patterns


@pytest.mark.parametrize("weights, share", [((3, 1), 0.75), ((1, 1), 0.5), ((1, 3), 0.25)])
def test_weights_give_each_source_its_share_of_samples(uneven_sources, weights, share):
    dataset = open_dataset(uneven_sources, weights=list(weights), resampled=True)
    big = np.array(["/big-" in path for path in dataset.paths])
    expected = dataset.shard_weights * dataset.sizes  # expected samples per draw, by shard
    assert expected[big].sum() / expected.sum() == pytest.approx(share, abs=1e-12)
    drawn = np.zeros(2)
    for epoch in range(2500):  # 20,000 shard draws with a fixed seed
        for shard in dataset.epoch_view(epoch, 0).order:
            drawn[0 if big[shard] else 1] += dataset.sizes[shard]
    # Standard error of the drawn share over 20,000 draws is at most 0.004 for these shares (binomial
    # count of big draws, times d(share)/d(fraction) <= 0.75), so 0.02 is 5 standard errors; drawing
    # by shard instead (the defect) gives 0.9 / 0.75 / 0.5, at least 0.15 away.
    assert drawn[0] / drawn.sum() == pytest.approx(share, abs=0.02)


def test_weighted_resampled_epoch_resumes_exactly(uneven_sources):
    dataset = open_dataset(uneven_sources, weights=[3, 1], resampled=True)

    def batches(start_batch):
        return list(make_train_loader(dataset, StandInPreprocess(), stand_in_tokenize, 4, epoch=3, seed=2,
                                      drop_last=False, start_batch=start_batch))
    full, resumed = batches(0), batches(2)
    assert len(full) > 3
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("weights, message", [
    ([1, float("inf")], "data.weights must be finite numbers >= 0 with a positive sum, got [1, inf]"),
    ([1, float("nan")], "data.weights must be finite numbers >= 0"),
    ([1, -1], "data.weights must be finite numbers >= 0"),
    ([0, 0], "with a positive sum"),
])
def test_bad_weights_are_refused_naming_data_weights(uneven_sources, weights, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        assert message in _error(uneven_sources, weights=weights, resampled=True)


def test_weights_need_several_sources_and_samples_in_each(uneven_sources, shards, tmp_path):
    assert "data.weights mixes several sources, so it needs data.sources" in _error(
        uneven_sources[0], weights=[2], resampled=True)
    empty = tmp_path / "empty-0.tar"
    tarfile.open(empty, "w").close()
    message = _error([uneven_sources[0], str(empty)], weights=[1, 1], resampled=True)
    assert f"data.weights gives source {empty} the weight 1.0, but its shards hold no samples" in message


# Counting shards that no sizes.json lists: progress on stderr, and how to avoid it.

def test_counting_unlisted_remote_shards_shows_progress_and_names_sizes_json(shards, served, tmp_path, capsys,
                                                                              monkeypatch):
    folder = _copy(shards, tmp_path / "s", sizes=False)
    for data in (f"pipe:cat {folder}/{PATTERN}", f"{served}/nosizes/{PATTERN}"):
        assert ShardDataset(data).sizes.tolist() == [4, 4, 4]
        err = capsys.readouterr().err
        assert "counting the samples of 3 shards not listed in a sizes.json beside them (3 streamed in full)" in err
        assert "`clipforge shards`" in err and "counting shard samples" in err and "3/3" in err
    for data in (f"pipe:cat {shards.paths[0].rsplit('/', 1)[0]}/{PATTERN}", f"{served}/good/{PATTERN}"):
        assert ShardDataset(data).sizes.tolist() == [4, 4, 4]  # a sizes.json beside the shards: no count
        assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # another process of a torchrun job: rank 0 speaks for it
    ShardDataset(f"pipe:cat {folder}/{PATTERN}")
    assert capsys.readouterr().err == ""
