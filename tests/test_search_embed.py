"""``clipforge embed``: clip-retrieval's layout from folders, listings and shards; skips; resume; ranks."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.runtime import cache_root

from _torchrun import torchrun

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SRC = str(Path(__file__).resolve().parents[1] / "src")
DEMO = cache_root() / "demo" / "data-64px"


@pytest.fixture(scope="module")
def demo_images() -> list[Path]:
    """60 of the demo's real 64 px images (several sources), or a skip naming what is missing."""
    listing = DEMO / "train.jsonl"
    if not listing.is_file():
        pytest.skip(f"demo data not prepared at {DEMO}; run: clipforge demo --prepare-only")
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    return [DEMO / row["image"] for row in rows[::80][:60]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny-vit with seeded random weights saved by clipforge.save (so --model is a real checkpoint)."""
    torch.manual_seed(0)
    return clipforge.save(clipforge.create_model("tiny-vit"), tmp_path_factory.mktemp("model") / "tiny")


def _bad_inputs(folder: Path, good: Path) -> list[Path]:
    """A truncated JPEG, a text file named .jpg and an empty PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.open(good).convert("RGB").resize((256, 256)).save(buffer, "JPEG", quality=95)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "not-an-image.jpg").write_text("hello, I am text")
    (folder / "empty.png").write_bytes(b"")
    return [truncated, folder / "not-an-image.jpg", folder / "empty.png"]


def _write_listing(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _embed(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``clipforge embed ...`` in a fresh process (kills and hangs cannot take pytest down)."""
    full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clipforge.cli", "embed", *args, "--device", "cpu", "--quiet"],
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def _collection(out: Path) -> dict:
    """Every file of an embedding folder: manifest, concatenated arrays, metadata rows, raw npy bytes."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [entry["part"] for entry in manifest["parts"]]
    result = {"manifest": manifest, "metadata": [], "bytes": {}}
    for modality, folder in (("image", "img_emb"), ("text", "text_emb")):
        if modality in manifest["modalities"]:
            paths = [out / folder / f"{folder}_{part}.npy" for part in parts]
            result[modality] = np.concatenate([np.load(path) for path in paths])
            result["bytes"][modality] = [path.read_bytes() for path in paths]
    for part in parts:
        result["metadata"] += pq.read_table(out / "metadata" / f"metadata_{part}.parquet").to_pylist()
    return result


def _reference_embeddings(checkpoint: Path, paths: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings computed directly with the model (the parity reference)."""
    model, preprocess = clipforge.load(str(checkpoint))
    with torch.no_grad():
        pixels = torch.stack([preprocess(clipforge.load_image(path).convert("RGB")) for path in paths])
        images = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        tokens = clipforge.tokenize(texts, context_length=model.context_length, truncate=True)
        captions = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    return images.numpy(), captions.numpy()


def test_listing_rows_match_model_and_bad_inputs_are_skipped(tmp_path, demo_images, checkpoint):
    bad = _bad_inputs(tmp_path / "bad", demo_images[0])
    good = demo_images[:20]
    rows = [{"image": str(path), "caption": f"picture {i}"} for i, path in enumerate(good)]
    rows.insert(3, {"image": str(bad[0]), "caption": "truncated"})
    rows.insert(8, {"image": str(bad[1]), "caption": "text file"})
    rows.insert(12, {"image": str(tmp_path / "missing.png"), "caption": "gone"})
    rows.insert(15, {"image": str(bad[2]), "caption": "empty"})
    rows[0]["caption"] = ["first of two", "second of two"]
    listing = _write_listing(tmp_path / "list.jsonl", rows)
    out = tmp_path / "out"
    result = _embed([str(listing), str(out), "--model", str(checkpoint), "--part-size", "7", "--batch-size", "4"])
    assert result.returncode == 1, result.stderr  # skipped inputs: warned, exit 1
    assert "skipped 4 unreadable input(s)" in result.stderr
    collection = _collection(out)
    manifest = collection["manifest"]
    assert manifest["complete"] and manifest["count"] == 20 and manifest["dim"] == 32
    assert manifest["modalities"] == ["image", "text"] and [p["rows"] for p in manifest["parts"]] == [6, 5, 6, 3]
    assert manifest["model"]["spec"] == str(checkpoint) and len(manifest["model"]["fingerprint"]) == 32
    reasons = {Path(entry["input"]).name: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "not-an-image.jpg", "missing.png", "empty.png"}
    assert "cannot read image file" in reasons["missing.png"] and "not a readable image" in reasons["truncated.jpg"]
    assert [row["image_path"] for row in collection["metadata"]] == [str(path) for path in good]
    assert collection["metadata"][0]["captions"] == ["first of two", "second of two"]
    assert [row["caption"] for row in collection["metadata"]] == ["first of two"] + [f"picture {i}" for i in range(1, 20)]
    assert collection["image"].dtype == np.float16 and collection["text"].shape == (20, 32)
    images, texts = _reference_embeddings(checkpoint, good, [row["caption"] for row in collection["metadata"]])
    np.testing.assert_allclose(collection["image"].astype(np.float32), images, atol=2e-3)
    np.testing.assert_allclose(collection["text"].astype(np.float32), texts, atol=2e-3)


def test_folder_is_walked_recursively_with_sidecar_captions(tmp_path, demo_images, checkpoint):
    folder = tmp_path / "photos"
    for i, path in enumerate(demo_images[:6]):
        target = folder / ("b" if i % 2 else "a") / f"{i:02d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        if i != 4:
            target.with_suffix(".txt").write_text(f"caption {i}\n")
    (folder / "notes.md").write_text("not an image, not listed")
    out = tmp_path / "out"
    assert main(["embed", str(folder), str(out), "--model", str(checkpoint), "--device", "cpu", "--quiet",
                 "--workers", "0"]) == 0
    collection = _collection(out)
    expected = sorted(str(p) for p in folder.rglob("*.png"))
    assert [row["image_path"] for row in collection["metadata"]] == expected
    captions = {Path(row["image_path"]).stem: row["caption"] for row in collection["metadata"]}
    assert captions["00"] == "caption 0" and captions["04"] is None
    assert collection["manifest"]["modalities"] == ["image", "text"] and collection["text"].shape == (6, 32)


def test_image_only_source_refuses_text_and_other_model(tmp_path, demo_images, checkpoint, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(demo_images[:3]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    out = tmp_path / "out"
    assert main(["embed", str(folder), str(out), "--model", str(checkpoint), "--device", "cpu", "--quiet",
                 "--modalities", "image,text"]) == 2
    assert "no captions found" in capsys.readouterr().err
    assert main(["embed", str(folder), str(out), "--model", str(checkpoint), "--device", "cpu", "--quiet"]) == 0
    assert _collection(out)["manifest"]["modalities"] == ["image"] and not (out / "text_emb").exists()
    # Another model into the same folder would mix embedding spaces: refused in one line.
    assert main(["embed", str(folder), str(out), "--model", "tiny-vit", "--seed", "1", "--device", "cpu",
                 "--quiet"]) == 2
    assert "made differently (model" in capsys.readouterr().err


def test_resume_after_kills_matches_uninterrupted(tmp_path, demo_images, checkpoint):
    rows = [{"image": str(path), "caption": f"image {i}"} for i, path in enumerate(demo_images[:48])]
    listing = _write_listing(tmp_path / "list.jsonl", rows)
    args = ["--model", str(checkpoint), "--part-size", "6", "--batch-size", "4", "--workers", "2"]
    reference = tmp_path / "reference"
    assert _embed([str(listing), str(reference), *args]).returncode == 0
    out = tmp_path / "resumed"
    for part in (1, 5):  # deterministic kills right after a part is committed
        killed = _embed([str(listing), str(out), *args], env={"CLIPFORGE_TEST_KILL_AFTER_PART": str(part)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not json.loads((out / "manifest.json").read_text())["complete"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "embed", str(listing), str(out), *args,
                                "--device", "cpu", "--quiet"], env=env, stderr=subprocess.DEVNULL)
    time.sleep(random.uniform(0.5, 3.0))  # a kill at a random moment: mid-part, mid-write or after the end
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert _embed([str(listing), str(out), *args]).returncode == 0
    resumed, uninterrupted = _collection(out), _collection(reference)
    assert resumed["bytes"] == uninterrupted["bytes"]  # byte for byte
    assert resumed["metadata"] == uninterrupted["metadata"] and resumed["manifest"] == uninterrupted["manifest"]
    assert len(resumed["image"]) == 48


def _write_shards(folder: Path, images: list[Path], per_shard: int) -> list[Path]:
    """Tar shards of (png, txt, json) samples; the JSON carries extra fields that become columns."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        path = folder / f"shard-{number}.tar"
        with tarfile.open(path, "w") as tar:
            for offset, image in enumerate(images[start:start + per_shard]):
                key = f"{start + offset:06d}"
                members = {"png": image.read_bytes(), "txt": f"sample {key}".encode(),
                           "json": json.dumps({"width": 64, "source": image.parent.name, "key": key}).encode()}
                if start + offset == 2:
                    members["png"] = b"\x89PNG broken"
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_shards_local_pipe_and_http_give_the_same_rows(tmp_path, demo_images, checkpoint):
    pytest.importorskip("webdataset")
    shards = _write_shards(tmp_path / "shards", demo_images[:14], per_shard=5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                 directory=str(tmp_path / "shards")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        sources = {"local": str(tmp_path / "shards" / "shard-{0..2}.tar"),
                   "pipe": f"pipe:cat {tmp_path}/shards/shard-{{0..2}}.tar",
                   "http": f"http://127.0.0.1:{port}/shard-{{0..2}}.tar"}
        collections = {}
        for name, source in sources.items():
            result = _embed([source, str(tmp_path / name), "--model", str(checkpoint), "--batch-size", "3"])
            assert result.returncode == 1, result.stderr  # the broken PNG is skipped
            collections[name] = _collection(tmp_path / name)
    finally:
        server.shutdown()
    local = collections["local"]
    assert local["manifest"]["count"] == 13 and [p["rows"] for p in local["manifest"]["parts"]] == [4, 5, 4]
    shard_0 = (tmp_path / "shards" / "shard-0.tar").resolve()
    assert [entry["input"] for entry in local["manifest"]["skipped"]] == [f"{shard_0}#000002.png"]
    first = local["metadata"][0]
    assert first["image_path"] == f"{shard_0}#000000.png" and first["caption"] == "sample 000000"  # as overlap names it
    assert first["width"] == 64 and first["source"] == demo_images[0].parent.name
    for name in ("pipe", "http"):  # the same rows, each named <the shard as given>#<member>
        assert collections[name]["bytes"] == local["bytes"]
        for row, local_row in zip(collections[name]["metadata"], local["metadata"], strict=True):
            assert {**row, "image_path": None} == {**local_row, "image_path": None}
            assert row["image_path"].rsplit("/", 1)[1] == local_row["image_path"].rsplit("/", 1)[1]
    assert collections["pipe"]["metadata"][0]["image_path"] == f"pipe:cat {tmp_path}/shards/shard-0.tar#000000.png"
    # A truncated shard: its readable samples are kept, the rest is listed, nothing hangs.
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2 + 100])
    result = _embed([str(tmp_path / "shards"), str(tmp_path / "damaged"), "--model", str(checkpoint)])
    damaged = _collection(tmp_path / "damaged")["manifest"]
    assert result.returncode == 1 and damaged["complete"] and 9 <= damaged["count"] < 13
    assert any("unreadable shard" in entry["reason"] for entry in damaged["skipped"])
    # A streamed shard cut exactly between two samples (no sizes.json): caught by its missing
    # end-of-archive block, where it used to read as a shorter shard with no word of the rest.
    with tarfile.open(shards[2]) as tar:
        members = tar.getmembers()
    stems = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    cut = next(m.offset for m in members if m.name.split(".")[0] == stems[2])
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "shard-2.tar").write_bytes(shards[2].read_bytes()[:cut])
    result = _embed([f"pipe:cat {tmp_path}/cut/shard-2.tar", str(tmp_path / "cut-emb"), "--model", str(checkpoint)])
    assert result.returncode != 0 and "end-of-archive" in result.stderr, result.stderr


@pytest.mark.distributed
def test_two_ranks_write_the_rows_of_one_process(tmp_path, demo_images, checkpoint):
    rows = [{"image": str(path), "caption": f"image {i}"} for i, path in enumerate(demo_images[:30])]
    listing = _write_listing(tmp_path / "list.jsonl", rows)
    args = ["embed", str(listing), "--model", str(checkpoint), "--part-size", "4", "--batch-size", "4",
            "--workers", "1", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "clipforge.cli", *args[:2], str(tmp_path / "one"), *args[2:]],
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    ranks = torchrun(["-m", "clipforge.cli", *args[:2], str(tmp_path / "two"), *args[2:]], tmp_path / "scratch",
                     timeout=240, env=env)
    assert ranks.returncode == 0, ranks.stderr
    one, two = _collection(tmp_path / "one"), _collection(tmp_path / "two")
    assert two["manifest"]["complete"] and two["manifest"]["count"] == 30
    assert two["metadata"] == one["metadata"] and two["manifest"] == one["manifest"]
    markers = [json.loads((tmp_path / "two" / ".clipforge" / f"part_{n}.json").read_text()) for n in range(8)]
    assert [marker["rank"] for marker in markers] == [0, 1] * 4  # each part embedded once, by rank part % 2
    np.testing.assert_array_equal(two["image"], one["image"])
    np.testing.assert_array_equal(two["text"], one["text"])


def test_search_package_imports_without_faiss():
    code = ("import sys; sys.modules['faiss'] = None; import clipforge.search as s; "
            "from clipforge.search import embed_collection; print(callable(embed_collection))")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
