"""Shards at scale as a user meets them (issue 14, section 4): streamed shards (``pipe:cat``, a real
http.server on 127.0.0.1) cut between two tar members stop at start-up naming the shard, while
intact ones written by Python's tarfile and by GNU tar (plain and gzip) read in full; a stale
sizes.json is reported; mixing by ``data.weights`` gives each source its share of the samples the
loader hands out; bad patterns and weights fail in one line; and a run over weighted, resampled
``pipe:`` and http sources (or one resampled local source), killed after a checkpoint and resumed,
repeats the uninterrupted run's per-step losses. Real tar shards of real images throughout."""
import collections
import functools
import gzip
import http.server
import json
import logging
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from _data_helpers import StandInPreprocess, make_pairs, stand_in_tokenize
from _kill_after_checkpoint import train_and_kill
from _train_data import make_shapes
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.data import ShardDataset, make_train_loader, write_shards


def _cut_before(shard: Path, member_index: int) -> bytes:
    """The bytes of ``shard`` up to the header of its ``member_index``-th member: a cut between members."""
    with tarfile.open(shard) as tar:
        return shard.read_bytes()[: tar.getmembers()[member_index].offset]


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """A folder without sizes.json: py.tar (6 samples, 3 members each, written by tarfile through
    write_shards), gnu.tar and gnu.tar.gz (the same members by GNU ``tar -cf`` / ``-czf``), and cuts
    of py.tar: between samples 3 and 4, inside sample 4 (after its first member), and that cut gzipped."""
    root = tmp_path_factory.mktemp("scale")
    caption_file, _ = make_pairs(root / "src", 6)
    packed = write_shards(caption_file, root / "packed", max_count=6, shuffle=False)
    folder = root / "www"
    folder.mkdir()
    shutil.copy(packed.paths[0], folder / "py.tar")
    members = root / "members"
    with tarfile.open(folder / "py.tar") as tar:
        names = tar.getnames()
        tar.extractall(members, filter="data")
    subprocess.run(["tar", "-cf", str(folder / "gnu.tar"), "-C", str(members), *names], check=True)
    subprocess.run(["tar", "-czf", str(folder / "gnu.tar.gz"), "-C", str(members), *names], check=True)
    (folder / "cut-between-samples.tar").write_bytes(_cut_before(folder / "py.tar", 9))
    (folder / "cut-inside-sample.tar").write_bytes(_cut_before(folder / "py.tar", 10))
    (folder / "cut-between-samples.tar.gz").write_bytes(gzip.compress(_cut_before(folder / "py.tar", 9)))
    return folder


@pytest.fixture(scope="module")
def http_root(www):
    """An http.server on 127.0.0.1 serving the parent of ``www`` (so ``/www/...`` and siblings)."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _url(transport: str, www: Path, http_root: str, name: str) -> str:
    return {"pipe": f"pipe:cat {www / name}", "http": f"{http_root}/www/{name}", "local": str(www / name)}[transport]


def _error(data, **kwargs) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        ShardDataset(data, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _keys(dataset, **kwargs) -> list[str]:
    loader = make_train_loader(dataset, StandInPreprocess(), stand_in_tokenize, kwargs.pop("batch_size", 3),
                               drop_last=False, **kwargs)
    batches = list(loader)
    assert not [s for b in batches for s in b.skipped]
    return sorted(k for b in batches for k in b.keys)


# 1. A streamed shard cut between two members: before, pipe:/http(s) read it as 3 (or 4) samples of 6.

CUTS = ("cut-between-samples.tar", "cut-inside-sample.tar", "cut-between-samples.tar.gz")


# A local uncompressed cut was refused before (test_shard_errors); a local gzipped one was not.
@pytest.mark.parametrize("transport, name", [(t, n) for t in ("pipe", "http") for n in CUTS] + [("local", CUTS[2])])
def test_shard_cut_between_members_stops_at_start_naming_it(www, http_root, transport, name):
    url = _url(transport, www, http_root, name)
    message = _error(url)
    assert message.startswith(f"shard {url}: ")
    assert "no end-of-archive block after its last member" in message and "cut short" in message
    expected = "a command writing a tar file to stdout" if transport == "pipe" else "a tar file of samples"
    assert f"expected {expected} (read at start-up to count its samples: no sizes.json lists it)" in message


@pytest.mark.parametrize("transport", ["pipe", "http", "local"])
@pytest.mark.parametrize("name", ["py.tar", "gnu.tar", "gnu.tar.gz"])
def test_intact_shards_of_tarfile_and_gnu_tar_read_in_full(www, http_root, transport, name):
    dataset = ShardDataset(_url(transport, www, http_root, name))
    assert len(dataset) == 6
    keys = _keys(dataset)
    assert len(keys) == 6 and len({k.split(":")[1] for k in keys}) == 6


def test_a_failing_command_whose_output_stops_between_members_names_its_status(www):
    offset = len(_cut_before(www / "py.tar", 9))
    url = f"pipe:head -c {offset} {www / 'py.tar'}; exit 4"
    assert _error(url).startswith(f"shard {url}: the command exited with status 4")


def test_listed_shard_cut_mid_run_keeps_the_samples_before_the_cut(www, http_root, tmp_path):
    folder = tmp_path / "listed"
    folder.mkdir()
    shutil.copy(www / "py.tar", folder / "a.tar")
    shutil.copy(www / "cut-between-samples.tar", folder / "b.tar")
    (folder / "sizes.json").write_text(json.dumps({"a.tar": 6, "b.tar": 6}))
    shutil.copytree(folder, www.parent / "listed")
    url = f"{http_root}/listed/b.tar"
    raws = ShardDataset(f"{http_root}/listed/{{a,b}}.tar").epoch_view(0, 0).read(0, 12)
    cut = [raw for raw in raws if raw.key.startswith("b.tar:")]
    assert [raw.error is None for raw in cut] == [True] * 3 + [False] * 3  # the third sample is kept too
    assert all(raw.error.startswith(f"unreadable shard {url}: damaged or not a tar file: no end-of-archive block")
               for raw in cut[3:])


def test_a_sizes_json_listing_fewer_samples_than_the_shard_holds_is_reported(www, tmp_path, caplog):
    folder = tmp_path / "stale"
    folder.mkdir()
    shutil.copy(www / "py.tar", folder / "s-0.tar")
    (folder / "sizes.json").write_text(json.dumps({"s-0.tar": 4}))  # a stale count: 2 samples never read
    with caplog.at_level(logging.WARNING, logger="clipforge.data"):
        keys = _keys(ShardDataset(str(folder / "s-0.tar")), batch_size=2)
    assert len(keys) == 4
    warned = [r.getMessage() for r in caplog.records if "holds more than the 4 samples its sizes.json lists" in r.getMessage()]
    assert warned and warned[0].startswith(f"shard {folder / 's-0.tar'} ")


# 2. Mixing: the share of samples the loader hands out follows data.weights.

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Source "many": 10 shards of 2 samples; source "few": 4 shards of 10 (a third / two thirds of the samples)."""
    patterns = []
    for name, count, per_shard in (("many", 20, 2), ("few", 40, 10)):
        caption_file, _ = make_pairs(tmp_path_factory.mktemp(f"src_{name}"), count)
        patterns.append(write_shards(caption_file, tmp_path_factory.mktemp(name), max_count=per_shard,
                                     prefix=name).pattern)
    return patterns


@pytest.mark.parametrize("weights, share, epochs", [((3, 1), 0.75, 300), ((1, 0), 1.0, 20)])
def test_loader_hands_out_each_source_its_weighted_share_of_samples(mixed, weights, share, epochs):
    dataset = ShardDataset(mixed, weights=list(weights), resampled=True)
    drawn, per_key = collections.Counter(), collections.Counter()
    for epoch in range(epochs):  # 300 epochs: about 10,000 samples
        for key in _keys(dataset, batch_size=8, epoch=epoch, seed=1):
            drawn[key.startswith("many-")] += 1
            per_key[key] += 1
    # 14 shard draws an epoch, 4,200 in 300: the share's standard error is about 0.011 at 3:1
    # (binomial count of "few" draws, 10 samples each), so 0.05 is over 4 of them; drawing shards
    # alike, or samples alike, would give 1/3 whatever the weights. (Measured: 0.759.)
    assert drawn[True] / sum(drawn.values()) == pytest.approx(share, abs=0.05)
    if share < 1:
        assert len(per_key) == 60  # every sample of both sources was drawn
        many = [n for key, n in per_key.items() if key.startswith("many-")]
        assert max(many) < 1.5 * min(many)  # within a source, samples come about equally often (375 +- 19)


# 3. Bad input: one line naming the pattern or data.weights and what was expected.

@pytest.mark.parametrize("bad, message", [
    ("many-{000000..}.tar", "braces that are neither a range ({0000..0099}, both ends numbers or letters) nor a list"),
    ("many-{000000..00000x}.tar", "braces that are neither a range"),
    ("many-{000000..000009.tar", "unbalanced braces; expected a .tar path, a brace pattern (data-{0000..0099}.tar)"),
    ("many-000000}.tar", "unbalanced braces; expected"),
    ("nothing-{0..3}.tar", "matches no files (first expected: "),
    ("many-*.tar", "wildcards are not expanded: name the shards with a brace range or give their folder"),
    ("", "an empty shard pattern ''; expected a .tar path"),
    ("SAME", "is named 2 times by"),
])
def test_bad_source_patterns_fail_in_one_line(mixed, bad, message):
    folder = mixed[0].rsplit("/", 1)[0]
    second = mixed[0] if bad == "SAME" else (f"{folder}/{bad}" if bad else bad)
    assert message in _error([mixed[0], second], weights=[1, 1], resampled=True)


@pytest.mark.parametrize("weights, message", [
    ([3], "data.weights has 1 values for 2 sources; give one per source"),
    ([3, 1, 1], "data.weights has 3 values for 2 sources"),
    ([3, -1], "data.weights must be finite numbers >= 0 with a positive sum, got [3, -1]"),
    ([0, 0], "with a positive sum, got [0, 0]"),
    ([True, 1], "data.weights must be finite numbers"),
])
def test_bad_weights_fail_in_one_line(mixed, weights, message):
    assert message in _error(mixed, weights=weights, resampled=True)


def test_cli_reports_bad_weights_and_patterns_in_one_line_before_training(mixed, tmp_path, capsys):
    for sources, weights in ((mixed, "3,-1"), ([mixed[0], mixed[0].replace("000009}", "000009")], "3,1")):
        args = ["train", "--model", "tiny-vit", "--steps", "1", "--run-dir", str(tmp_path / "run"),
                "--set", f"data.sources=[{', '.join(sources)}]", "--set", f"data.weights={weights}",
                "--set", "data.resampled=true"]
        assert main(args) == 2
        last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
        assert last.startswith("clipforge train: error: ") and ("data.weights" in last or "unbalanced braces" in last)
        assert not (tmp_path / "run").exists()


# 4. Exact resume over resampled and weighted pipe:/http sources, killed after a checkpoint.

STEPS, KILL_AFTER = 8, 3  # 5 shards of 4 drawn an epoch, 2 lanes of 2 batches of 4: epoch 0 ends at step 4


@pytest.fixture(scope="module")
def train_sources(tmp_path_factory, http_root, www):
    """Drawn-shape photos: "a", 3 shards of 4 with sizes.json; "b", 2 shards of 4 served over http without one."""
    root = tmp_path_factory.mktemp("train_sources")
    patterns = {}
    for name, count in (("a", 12), ("b", 8)):
        out = www.parent / f"train_{name}" if name == "b" else root / name
        patterns[name] = write_shards(make_shapes(root / f"src_{name}", count), out, max_count=4, prefix=name).pattern
    (www.parent / "train_b" / "sizes.json").unlink()
    return {"local": patterns["a"], "pipe": f"pipe:cat {patterns['a']}",
            "http": f"{http_root}/train_b/{patterns['b'].rsplit('/', 1)[1]}"}


def _train_args(run_dir: Path, settings: list[str]) -> list[str]:
    args = ["train", "--model", "tiny-vit", "--batch-size", "4", "--steps", str(STEPS), "--run-dir", str(run_dir)]
    for item in ["data.workers=2", f"run.checkpoint_every={KILL_AFTER}", "run.keep=0", "run.progress=false",
                 "run.log_every=1", "optim.warmup_steps=1", "deterministic=true", "data.resampled=true", *settings]:
        args += ["--set", item]
    return args


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resampled local source", "weighted pipe: and http sources"])
def test_resume_after_kill_matches_uninterrupted_over_resampled_shards(train_sources, tmp_path, case):
    if case.startswith("weighted"):
        settings = [f"data.sources=[{train_sources['pipe']}, {train_sources['http']}]", "data.weights=3,1"]
    else:
        settings = [f"data.train={train_sources['local']}"]
    assert main(_train_args(tmp_path / "whole", settings)) == 0
    killed = tmp_path / "killed"
    output = train_and_kill(_train_args(killed, settings), KILL_AFTER)
    assert (killed / "checkpoints" / f"step_{KILL_AFTER:08d}").exists(), output
    assert main(["train", "--run-dir", str(killed), "--resume", "latest"]) == 0
    whole, resumed = _losses(tmp_path / "whole"), _losses(killed)
    assert sorted(whole) == sorted(resumed) == list(range(1, STEPS + 1))
    assert len({round(loss, 4) for loss in whole.values()}) > 1, "batches must differ from step to step"
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([whole[s] for s in sorted(whole)], abs=1e-6)
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    expected, got = load_file(str(tmp_path / "whole" / final)), load_file(str(killed / final))
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
