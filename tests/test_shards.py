"""Packing a folder of real images plus captions into tar shards, and the ``clipforge shards`` command."""
import argparse
import json
import os
import tarfile

import pytest
import webdataset
from _data_helpers import make_images, make_pairs, write_caption_file

from clipforge.cli import COMMANDS, CliError
from clipforge.cli import shards as shards_cli
from clipforge.data import write_shards


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return make_pairs(root, 12)


def test_max_count_splits_shards_and_sizes_json_counts_them(pairs, tmp_path):
    caption_file, names = pairs
    written = write_shards(caption_file, tmp_path / "out", max_count=5)
    assert [os.path.basename(p) for p in written.paths] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert written.pattern == str(tmp_path / "out" / "data-{000000..000002}.tar")
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        "data-000000.tar": 5, "data-000001.tar": 5, "data-000002.tar": 2}
    assert written.num_samples == 12 and written.num_skipped == 0
    assert written.num_bytes == sum(os.path.getsize(p) for p in written.paths)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_shards_hold_original_bytes_and_captions_readable_by_webdataset(pairs, tmp_path):
    caption_file, names = pairs
    written = write_shards(caption_file, tmp_path / "out", max_count=5, shuffle=False)
    samples = list(webdataset.WebDataset(written.pattern, shardshuffle=False))
    assert len(samples) == 12
    for row, sample in enumerate(samples):
        assert sample["__key__"] == f"{row:08d}"
        extension = names[row].rsplit(".", 1)[1]
        assert sample[extension] == (caption_file.parent / names[row]).read_bytes()
        assert sample["txt"].decode() == f"photo number {row}"
        assert json.loads(sample["json"]) == {"image": names[row], "caption": f"photo number {row}"}


def test_rows_are_shuffled_by_seed(pairs, tmp_path):
    caption_file, _ = pairs
    def order(seed, name):
        written = write_shards(caption_file, tmp_path / name, seed=seed)
        return [s["__key__"] for s in webdataset.WebDataset(written.pattern, shardshuffle=False)]
    first = order(0, "a")
    assert sorted(first) == [f"{i:08d}" for i in range(12)] and first != sorted(first)
    assert first == order(0, "b") and first != order(1, "c")


def test_max_size_bounds_every_shard_file(pairs, tmp_path):
    caption_file, _ = pairs
    limit_mb = 0.03
    written = write_shards(caption_file, tmp_path / "out", max_size_mb=limit_mb)
    assert len(written.paths) > 1
    assert all(os.path.getsize(p) <= limit_mb * 1e6 for p in written.paths)
    assert written.num_samples == 12


def test_sample_larger_than_max_size_gets_a_shard_of_its_own(pairs, tmp_path):
    caption_file, _ = pairs
    written = write_shards(caption_file, tmp_path / "out", max_size_mb=0.001)
    assert len(written.paths) == 12 and written.num_samples == 12


def test_multi_caption_rows_are_stored_as_json_lists(tmp_path):
    names = make_images(tmp_path / "im", 2)
    path = write_caption_file(tmp_path / "m.jsonl", [(f"im/{names[0]}", ["one", "two"]), (f"im/{names[1]}", "solo")])
    written = write_shards(path, tmp_path / "out", shuffle=False)
    first, second = webdataset.WebDataset(written.pattern, shardshuffle=False)
    assert "txt" not in first and json.loads(first["json"])["caption"] == ["one", "two"]
    assert second["txt"] == b"solo"
    assert written.pattern == written.paths[0]  # a single shard is named plainly


def test_unreadable_images_are_left_out_and_counted(tmp_path):
    names = make_images(tmp_path / "im", 3)
    rows = [(f"im/{n}", "x") for n in names] + [("im/missing.jpg", "gone")]
    written = write_shards(write_caption_file(tmp_path / "c.csv", rows), tmp_path / "out")
    assert written.num_samples == 3 and written.num_skipped == 1


def test_existing_shards_are_not_mixed_with_new_ones(pairs, tmp_path):
    caption_file, _ = pairs
    write_shards(caption_file, tmp_path / "out", max_count=2)
    with pytest.raises(FileExistsError, match="already holds 6 data-\\*.tar shards"):
        write_shards(caption_file, tmp_path / "out", max_count=5)
    written = write_shards(caption_file, tmp_path / "out", max_count=5, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [os.path.basename(p) for p in written.paths]


def test_tar_members_are_dot_free_keys_with_one_extension(pairs, tmp_path):
    caption_file, _ = pairs
    written = write_shards(caption_file, tmp_path / "out")
    with tarfile.open(written.paths[0]) as tar:
        assert all(name.count(".") == 1 for name in tar.getnames())


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="clipforge")
    shards_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_packs_shards_and_prints_the_pattern(pairs, tmp_path, capsys):
    caption_file, _ = pairs
    assert "shards" in COMMANDS
    out = tmp_path / "cli"
    code = _run_cli(["shards", str(caption_file.parent), str(caption_file), str(out), "--max-count", "4",
                     "--max-size", "100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 12 samples in 3 shards" in printed
    assert f"--data '{out}/data-{{000000..000002}}.tar'" in printed
    with pytest.raises(CliError, match="--overwrite"):
        _run_cli(["shards", str(caption_file.parent), str(caption_file), str(out)])


def test_rows_without_a_caption_are_left_out_and_counted(tmp_path):
    names = make_images(tmp_path / "im", 3)
    rows = [(f"im/{names[0]}", "a caption"), (f"im/{names[1]}", ""), (f"im/{names[2]}", "   ")]
    written = write_shards(write_caption_file(tmp_path / "c.csv", rows), tmp_path / "out")
    assert (written.num_samples, written.num_skipped, written.num_no_caption) == (1, 2, 1 + 1)
    members = tarfile.open(written.paths[0]).getnames()
    assert [m for m in members if m.endswith(".txt")] == ["00000000.txt"]


def test_a_failed_overwrite_keeps_the_old_set(pairs, tmp_path):
    caption_file, _ = pairs
    old = write_shards(caption_file, tmp_path / "out", max_count=4)
    before = {p: open(p, "rb").read() for p in old.paths}
    (tmp_path / "im").mkdir()
    (tmp_path / "im" / "junk.jpg").write_bytes(b"not a jpeg")  # found, but does not decode
    rows = [("im/junk.jpg", "junk")]
    with pytest.raises(ValueError, match="no shards written"):
        write_shards(write_caption_file(tmp_path / "bad.csv", rows), tmp_path / "out", overwrite=True)
    assert {p: open(p, "rb").read() for p in old.paths} == before
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {os.path.basename(p): 4 for p in old.paths}
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*map(os.path.basename, old.paths), "sizes.json"])


@pytest.mark.parametrize("size", [float("inf"), float("nan"), 0.0])
def test_a_shard_size_that_is_not_a_finite_positive_number_is_refused(pairs, tmp_path, size):
    with pytest.raises(ValueError, match="max_size_mb a finite number > 0"):
        write_shards(pairs[0], tmp_path / "out", max_size_mb=size)


def test_a_terminated_pack_leaves_no_shard_and_a_rerun_works(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    names = make_images(tmp_path / "im", 400)
    caption_file = write_caption_file(tmp_path / "c.csv", [(f"im/{n}", f"image {n}") for n in names])
    slow = (f"import time, clipforge.data.shards as s\n"  # a pack slow enough to be stopped half-way
            f"real = s._encode\n"
            f"s._encode = lambda *a: (time.sleep(0.01), real(*a))[1]\n"
            f"from clipforge.cli import main\n"
            f"raise SystemExit(main(['shards', {str(tmp_path)!r}, {str(caption_file)!r}, {str(tmp_path / 'out')!r},"
            f" '--max-count', '20']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", slow], env=env, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / "out"
    deadline = time.time() + 60
    while time.time() < deadline and not list(staging.glob(".shards-staging-*/data-000002.tar")):
        time.sleep(0.05)
    assert list(staging.glob(".shards-staging-*/data-000002.tar")), "the pack never reached its third shard"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130, process.stderr.read()
    assert os.listdir(tmp_path / "out") == []  # no shard, no sizes.json, no staging folder
    written = write_shards(caption_file, tmp_path / "out", max_count=20)
    assert written.num_samples == 400 and len(written.paths) == 20
