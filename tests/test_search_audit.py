"""Audit of the search commands' edges: ``serve`` on a taken port, shard samples named alike by
``embed`` and ``overlap``, and embeddings reused only for inputs whose content is what was embedded
(a file edited behind its old size and modification time is embedded again)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

import clipforge
from clipforge.evaluate import model_fingerprint

from _cli_errors import error_lines, run_cli
from _search_fixtures import COLORS, SHAPES, draw_shape, fixture_model

pytestmark = pytest.mark.slow  # embeds, serves and runs the CLI end to end

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _png(color: str, shape: str) -> bytes:
    """An uncompressed PNG: every image of these dimensions has the same byte size."""
    buffer = io.BytesIO()
    draw_shape(color, shape, size=(40, 32)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """``train/`` with 8 shape images, the fixture model saved as a checkpoint, ``emb/`` (embed of train/)."""
    root = tmp_path_factory.mktemp("search-audit")
    model = fixture_model()
    checkpoint = clipforge.save(model, root / "model")
    (root / "train").mkdir()
    for number, (color, shape) in enumerate([(c, s) for c in COLORS[:4] for s in SHAPES[:2]]):
        (root / "train" / f"{number:02d}-{color}-{shape}.png").write_bytes(_png(color, shape))
    _embed(model, root / "train", root / "emb")
    return root, model, checkpoint


def test_serve_on_a_taken_port_stops_with_one_line_before_announcing(shapes, capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("faiss")
    root, _, checkpoint = shapes
    with socket.socket() as holder:  # another program listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        status, _, stderr = run_cli(capsys, "serve", root / "emb", "--model", checkpoint, "--port", port)
    lines = error_lines(stderr)
    assert status == 2 and "Traceback" not in stderr and "serving" not in stderr, stderr
    assert lines == [f"clipforge serve: error: 127.0.0.1:{port} is taken (another program listens on it); "
                     "pass --port with a free port"]
    status, _, stderr = run_cli(capsys, "serve", root / "emb", "--model", checkpoint, "--host", "192.0.2.1")
    lines = error_lines(stderr)  # TEST-NET-1: an address of no machine here
    assert status == 2 and len(lines) == 1 and "--host 192.0.2.1: cannot bind 192.0.2.1:1234" in lines[0], stderr


def _rows(out: Path) -> tuple[list[str], np.ndarray]:
    """``(image paths, image embeddings)`` of an embed folder, in row order."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [entry["part"] for entry in manifest["parts"]]
    names = [name for part in parts for name in
             pq.read_table(out / "metadata" / f"metadata_{part}.parquet").column("image_path").to_pylist()]
    return names, np.concatenate([np.load(out / "img_emb" / f"img_emb_{part}.npy") for part in parts])


def _same_size_edit(path: Path, color: str, shape: str) -> None:
    """New content of the same byte size under the old modification time (``cp -p``, a restore, ``touch -d``)."""
    before = path.stat()
    data = _png(color, shape)
    assert len(data) == before.st_size and data != path.read_bytes()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size


def _embed(model, folder: Path, out: Path) -> None:
    from clipforge.search import embed_collection

    embed_collection(folder, out, model, num_workers=0, progress=False, part_size=3)


def test_overlap_does_not_reuse_a_file_edited_behind_its_old_size_and_mtime(shapes, tmp_path):
    from clipforge.search import read_embedding_manifest, stored_image_embeddings

    root, model, _ = shapes
    train, out = tmp_path / "train", tmp_path / "emb"
    shutil.copytree(root / "train", train)
    _embed(model, train, out)
    paths = sorted(str(path) for path in train.iterdir())
    _same_size_edit(Path(paths[4]), "cyan", "triangle")
    blocks, rest, summary = stored_image_embeddings(out, read_embedding_manifest(out), paths,
                                                    model_fingerprint(model), "fp32")
    assert rest == [paths[4]] and summary["reused"] == 7 and summary["changed"] == 1
    assert sorted(path for kept, _ in blocks for path in kept) == paths[:4] + paths[5:]


def test_embed_again_redoes_parts_whose_files_were_edited_behind_their_mtime_or_shifted(shapes, tmp_path):
    root, model, _ = shapes
    train, out = tmp_path / "train", tmp_path / "emb"
    shutil.copytree(root / "train", train)
    _embed(model, train, out)
    _same_size_edit(sorted(train.iterdir())[4], "cyan", "triangle")
    _embed(model, train, out)  # the part holding it is embedded again: equal to a fresh run
    _embed(model, train, tmp_path / "fresh")
    (names, vectors), (fresh_names, fresh_vectors) = _rows(out), _rows(tmp_path / "fresh")
    assert names == fresh_names and np.array_equal(vectors, fresh_vectors)

    # a file added in front shifts every part's inputs (still 3 parts of 3): all are embedded again
    (train / "00-first.png").write_bytes(_png("black", "square"))
    _embed(model, train, out)
    _embed(model, train, tmp_path / "fresh-9")
    (names, vectors), (fresh_names, fresh_vectors) = _rows(out), _rows(tmp_path / "fresh-9")
    assert len(names) == 9 and names == fresh_names and np.array_equal(vectors, fresh_vectors)


def test_embed_again_takes_over_a_version_1_folder_and_refuses_a_newer_one(shapes, tmp_path):
    root, model, _ = shapes
    out = tmp_path / "emb"
    shutil.copytree(root / "emb", out)
    for path in [out / ".clipforge" / "run.json", *(out / ".clipforge").glob("part_*.json")]:
        state = json.loads(path.read_text())
        state.pop("version")
        path.write_text(json.dumps(state))  # as clipforge wrote them before version 2
    for path in (out / ".clipforge").glob("inputs_*.parquet"):
        path.unlink()
    _embed(model, root / "train", out)
    markers = [json.loads(path.read_text()) for path in sorted((out / ".clipforge").glob("part_*.json"))]
    assert len(markers) == 3 and all(marker["version"] == 2 for marker in markers)
    assert len(list((out / ".clipforge").glob("inputs_*.parquet"))) == 3
    (names, vectors), (old_names, old_vectors) = _rows(out), _rows(root / "emb")
    assert names == old_names and np.array_equal(vectors, old_vectors)
    run = json.loads((out / ".clipforge" / "run.json").read_text())
    (out / ".clipforge" / "run.json").write_text(json.dumps({**run, "version": 3}))
    with pytest.raises(ValueError, match="written by a newer clipforge embed"):
        _embed(model, root / "train", out)


@pytest.fixture(scope="module")
def shards(shapes):
    """``shards/train-{0,1}.tar`` (the 8 training images, member ``000003.PNG`` upper case) and
    ``eval/<class>/`` with exact copies of two of them and one other image."""
    root, _, _ = shapes
    files = sorted((root / "train").iterdir())
    (root / "shards").mkdir()
    members = {}
    for number, group in enumerate((files[:4], files[4:])):
        with tarfile.open(root / "shards" / f"train-{number}.tar", "w") as tar:
            for k, path in enumerate(group):
                key = f"{number:02d}{k:04d}"
                name = f"{key}.PNG" if (number, k) == (0, 3) else f"{key}.png"
                for member, data in ((name, path.read_bytes()), (f"{key}.txt", b"a shape")):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                members[path.name] = f"{os.path.realpath(root / 'shards' / f'train-{number}.tar')}#{name}"
    for folder, source in (("a", files[3]), ("b", files[5])):
        (root / "eval" / folder).mkdir(parents=True)
        shutil.copyfile(source, root / "eval" / folder / source.name)
    (root / "eval" / "b" / "other.png").write_bytes(_png("purple", "triangle"))
    return root, {files[3].name: members[files[3].name], files[5].name: members[files[5].name]}


def _overlap(capsys, root: Path, out: Path, *extra) -> tuple[dict, dict]:
    """``({eval image name: nearest training image}, report)`` of an overlap run over the shards."""
    status, _, stderr = run_cli(capsys, "overlap", "--train", root / "shards" / "train-{0..1}.tar",
                                "--data", root / "eval", "--features", "model", "--model", root / "model",
                                "--out", out, "--workers", "0", "--no-cache", *extra)
    assert status == 0, stderr
    nearest = {Path(row["eval_image"]).name: row["nearest_train_image"]
               for row in csv.DictReader((out / "pairs.csv").open())}
    return nearest, json.loads((out / "report.json").read_text())


def test_overlap_names_shard_images_alike_through_train_embeddings(shards, tmp_path, capsys):
    root, duplicates = shards
    pattern = str(root / "shards" / "train-{0..1}.tar")
    status, _, stderr = run_cli(capsys, "embed", pattern, tmp_path / "emb", "--model", root / "model",
                                "--workers", "0", "--quiet")
    assert status == 0, stderr
    names, _ = _rows(tmp_path / "emb")
    assert set(duplicates.values()) <= set(names)  # embed names a shard sample as overlap does

    fresh, _ = _overlap(capsys, root, tmp_path / "fresh")
    reused, report = _overlap(capsys, root, tmp_path / "reused", "--train-embeddings", tmp_path / "emb")
    assert report["train_embeddings"]["reused"] == 8 and report["train_embeddings"]["embedded"] == 0
    for name, member in duplicates.items():
        assert fresh[name] == reused[name] == member

    # a folder written before version 2 (shard.tar:key names, no fingerprints) is still reused
    legacy = tmp_path / "emb-v1"
    shutil.copytree(tmp_path / "emb", legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    manifest["version"] = 1
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    for inputs in (legacy / ".clipforge").glob("inputs_*.parquet"):
        inputs.unlink()
    for path in (legacy / "metadata").glob("*.parquet"):
        table = pq.read_table(path)
        old = [f"{Path(name.split('#')[0]).name}:{name.split('#')[1].split('.')[0]}"
               for name in table.column("image_path").to_pylist()]
        pq.write_table(table.set_column(0, "image_path", pa.array(old)), path)
    reused_v1, report = _overlap(capsys, root, tmp_path / "reused-v1", "--train-embeddings", legacy)
    assert report["train_embeddings"]["reused"] == 8 and reused_v1 == reused

    # a shard member edited behind the shard's old size and mtime: that member is embedded again
    shard = root / "shards" / "train-1.tar"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = tar.getmember(duplicates[sorted(duplicates)[1]].split("#")[1])
    replacement = _png("orange", "circle")
    assert len(replacement) == member.size
    data[member.offset_data:member.offset_data + member.size] = replacement
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    _, report = _overlap(capsys, root, tmp_path / "edited", "--train-embeddings", tmp_path / "emb")
    assert report["train_embeddings"]["reused"] == 7 and report["train_embeddings"]["changed"] == 1


@pytest.mark.parametrize("argv, message", [
    (["embed", "photos", "out", "--model", "m", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["embed", "photos", "out", "--model", "m", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["embed", "photos", "out", "--model", "m", "--part-size", "0"], "argument --part-size: must be at least 1"),
    (["serve", "out", "--model", "m", "--batch-wait-ms", "inf"], "argument --batch-wait-ms: must be 0 to 60000"),
    (["serve", "out", "--model", "m", "--batch-wait-ms", "nan"], "argument --batch-wait-ms: must be 0 to 60000"),
])
def test_embed_and_serve_refuse_impossible_counts_and_waits_when_parsing(argv, message, capsys):
    from clipforge.cli import build_parser

    with pytest.raises(SystemExit) as stop:  # an infinite wait used to stall the query encoder's thread
        build_parser().parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
