"""Reading WebDataset tar shards written by ``write_shards``: patterns, counts, captions, damage."""
import io
import json
import shutil
import subprocess
import tarfile

import pytest
import webdataset
from _data_helpers import make_pairs
from PIL import Image

from clipforge.data import ShardDataset, open_dataset, write_shards
from clipforge.data.samples import BadSample, to_pair
from clipforge.data.webdataset import count_samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    caption_file, _ = make_pairs(root, 11)
    return write_shards(caption_file, root / "shards", max_count=4)


def _write_raw_shard(path, samples):
    with webdataset.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def _jpeg_bytes():
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def test_brace_pattern_reads_every_sample_as_webdataset_does(shards):
    dataset = ShardDataset(shards.pattern)
    assert len(dataset) == 11 and list(dataset.sizes) == [4, 4, 3]
    view = dataset.epoch_view(epoch=0, seed=0)
    ours = {raw.key.split(":")[1]: raw for raw in view.read(0, len(dataset))}  # crosses shard boundaries
    theirs = {s["__key__"]: s for s in webdataset.WebDataset(shards.pattern, shardshuffle=False)}
    assert sorted(ours) == sorted(theirs)
    for key, raw in ours.items():
        assert raw.captions == [theirs[key]["txt"].decode()]
        image, caption = to_pair(raw, 0, 0, 0)
        assert image.size == (40, 32) and caption.startswith("photo number")


def test_shard_order_is_shuffled_per_epoch_with_the_seed(shards):
    dataset = ShardDataset(shards.pattern)
    def shard_sequence(epoch, seed):
        return list(dataset.epoch_view(epoch, seed).order)
    orders = {tuple(shard_sequence(e, 0)) for e in range(6)}
    assert len(orders) > 1 and shard_sequence(3, 0) == shard_sequence(3, 0)


def test_counts_without_sizes_json_come_from_tar_headers(shards, tmp_path):
    for path in shards.paths:
        shutil.copy(path, tmp_path)
    assert [count_samples(p) for p in shards.paths] == [4, 4, 3]
    assert list(ShardDataset(str(tmp_path)).sizes) == [4, 4, 3]  # a folder of shards, no sizes.json


def test_shards_packed_by_gnu_tar_and_gzip_are_counted(shards, tmp_path):
    """Shards from other tools pass the end-of-archive check: GNU tar's own layout (record padding)
    and a gzip-compressed tar, where the check does not apply (offsets are in the inflated stream)."""
    members = tmp_path / "members"
    with tarfile.open(shards.paths[0]) as tar:
        tar.extractall(members, filter="data")
    names = sorted(p.name for p in members.iterdir())
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(members), *names], check=True)
    subprocess.run(["tar", "-czf", str(tmp_path / "gnu.tar.gz"), "-C", str(members), *names], check=True)
    assert count_samples(str(tmp_path / "gnu.tar")) == 4
    assert count_samples(str(tmp_path / "gnu.tar.gz")) == 4


def test_open_dataset_accepts_pattern_folder_and_list(shards):
    folder = shards.paths[0].rsplit("/", 1)[0]
    for data in (shards.pattern, folder, shards.paths):
        dataset = open_dataset(data)
        assert isinstance(dataset, ShardDataset) and len(dataset) == 11


def test_json_caption_and_list_captions_are_read(tmp_path):
    _write_raw_shard(tmp_path / "j.tar", [
        {"__key__": "a", "png": _jpeg_bytes(), "json": json.dumps({"caption": "from json"}).encode()},
        {"__key__": "b", "webp": _jpeg_bytes(), "json": json.dumps({"title": ["t1", "t2"]}).encode()},
    ])
    raws = ShardDataset(str(tmp_path / "j.tar")).epoch_view(0, 0).read(0, 2)
    assert raws[0].captions == ["from json"] and raws[1].captions == ["t1", "t2"]


def test_sample_without_caption_later_in_a_shard_is_a_bad_sample(tmp_path):
    _write_raw_shard(tmp_path / "m.tar", [
        {"__key__": "a", "jpg": _jpeg_bytes(), "txt": b"ok"},
        {"__key__": "b", "jpg": _jpeg_bytes()},
        {"__key__": "c", "txt": b"caption but no image"},
    ])
    raws = ShardDataset(str(tmp_path / "m.tar")).epoch_view(0, 0).read(0, 3)
    assert [r.key for r in raws] == ["m.tar:a", "m.tar:b", "m.tar:c"]
    with pytest.raises(BadSample, match="no caption"):
        to_pair(raws[1], 0, 0, 1)
    with pytest.raises(BadSample, match="no image"):
        to_pair(raws[2], 0, 0, 2)


def test_truncated_shard_yields_bad_samples_for_its_lost_tail(shards, tmp_path):
    data = open(shards.paths[0], "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "sizes.json").write_text(json.dumps({"cut.tar": 4}))
    raws = ShardDataset(str(tmp_path / "cut.tar")).epoch_view(0, 0).read(0, 4)
    assert len(raws) == 4
    assert raws[0].error is None and raws[-1].error is not None


# Configuration errors: raised when the shards are opened.

def test_pattern_matching_no_files_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"matches no files"):
        ShardDataset(str(tmp_path / "data-{0000..0009}.tar"))


def test_partly_missing_shards_fail(shards):
    pattern = shards.pattern.replace("000002}", "000005}")
    with pytest.raises(FileNotFoundError, match="3 of 6 shards .* are missing"):
        ShardDataset(pattern)


def test_folder_without_shards_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards in folder"):
        open_dataset(tmp_path)


def test_shards_without_captions_fail_before_training(tmp_path):
    _write_raw_shard(tmp_path / "labels-0.tar", [{"__key__": f"{i}", "jpg": _jpeg_bytes(), "cls": b"3"} for i in range(3)])
    with pytest.raises(ValueError, match="have no captions: sample labels-0.tar:0 has cls, jpg but no .txt"):
        ShardDataset(str(tmp_path / "labels-{0..0}.tar"))


def test_shards_without_images_or_samples_fail(tmp_path):
    _write_raw_shard(tmp_path / "t.tar", [{"__key__": "0", "txt": b"caption only"}])
    with pytest.raises(ValueError, match="hold no images"):
        ShardDataset(str(tmp_path / "t.tar"))
    _write_raw_shard(tmp_path / "empty.tar", [])
    with pytest.raises(ValueError, match="hold no samples"):
        ShardDataset(str(tmp_path / "empty.tar"))
