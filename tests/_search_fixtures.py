"""Small real collections for the search service tests, written in `clipforge embed`'s on-disk layout.

Images are drawn with PIL (coloured shapes), embedded with a seeded ``tiny-vit`` (its positional
embedding zeroed, so random-weight embeddings of different images spread out instead of all
sitting near cosine 0.95), split into parts of 2 rows (so part 10 must sort after part 9), and
indexed with real FAISS: a Flat image index and an HNSW text index with a ``search_params`` string.
A running server is a real uvicorn on a free loopback port in a thread.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import clipforge

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
SHAPES = ["circle", "square", "triangle"]
PART_ROWS = 2


def fixture_model() -> torch.nn.Module:
    """A seeded tiny-vit whose image embeddings differ between images (see the module docstring)."""
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    with torch.no_grad():
        model.visual.positional_embedding.zero_()
        model.visual.class_embedding.zero_()
    return model


def draw_shape(color: str, shape: str, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """A ``shape`` in ``color`` on white."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    box = (width * 0.15, height * 0.12, width * 0.85, height * 0.88)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(width / 2, height * 0.05), (width * 0.95, height * 0.95), (width * 0.05, height * 0.95)],
                     fill=color)
    return image


@dataclass
class Rows:
    """What a collection holds, row by row."""

    image_paths: list
    captions: list
    extra: list


def write_images(folder: Path) -> Rows:
    """24 shape images, one exact duplicate, a symlink pointing outside ``folder`` and a text-only row."""
    images = folder / "images"
    (images / "shapes").mkdir(parents=True)
    paths, captions = [], []
    for color in COLORS:
        for shape in SHAPES:
            path = images / "shapes" / f"{color}-{shape}.png"
            draw_shape(color, shape).save(path)
            paths.append(str(path))
            captions.append(f"a {color} {shape}")
    duplicate = images / "shapes" / "red-circle-copy.png"
    duplicate.write_bytes(Path(paths[0]).read_bytes())
    paths.append(str(duplicate))
    captions.append("a red circle again")
    outside = folder / "outside" / "secret.png"  # a real image, but not under the image root
    outside.parent.mkdir()
    draw_shape("green", "circle").save(outside)
    link = images / "link-out.png"
    os.symlink(outside, link)
    paths.append(str(link))
    captions.append("a link that points outside the images")
    paths.append(None)
    captions.append("a caption without an image")
    extra = [{"source": "fixture", "row": row} for row in range(len(paths))]
    return Rows(paths, captions, extra)


@torch.no_grad()
def embed_rows(model, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """``(image_embeddings, text_embeddings)``, float16, L2-normalised; a row without image gets a blank."""
    preprocess = clipforge.image_transform(model.config.vision.image_size)
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) if path
                          else torch.zeros(3, model.config.vision.image_size, model.config.vision.image_size)
                          for path in rows.image_paths])  # (N, 3, H, W)
    image_embeddings = model.encode_image(pixels)
    text_embeddings = model.encode_text(clipforge.tokenize(rows.captions))
    normalise = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy().astype(np.float16)  # noqa: E731
    return normalise(image_embeddings), normalise(text_embeddings)


def write_collection(out: Path, model, rows: Rows, modalities=("image", "text"), indexes: dict | None = None) -> Path:
    """Write ``out`` in the contract's layout; ``indexes`` maps modality -> (factory, search_params)."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.evaluate import model_fingerprint

    image_embeddings, text_embeddings = embed_rows(model, rows)
    arrays = {"image": ("img_emb", image_embeddings), "text": ("text_emb", text_embeddings)}
    count = len(rows.image_paths)
    parts = list(range(0, count, PART_ROWS))
    for modality in modalities:
        folder, array = arrays[modality]
        (out / folder).mkdir(parents=True, exist_ok=True)
        for part, start in enumerate(parts):
            np.save(out / folder / f"{folder}_{part}.npy", array[start:start + PART_ROWS])
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(parts):
        stop = start + PART_ROWS
        table = pa.table({"image_path": pa.array(rows.image_paths[start:stop], pa.string()),
                          "caption": pa.array(rows.captions[start:stop], pa.string()),
                          "captions": pa.array([[caption] for caption in rows.captions[start:stop]],
                                               pa.list_(pa.string())),
                          "source": [extra["source"] for extra in rows.extra[start:stop]],
                          "row": [extra["row"] for extra in rows.extra[start:stop]]})
        pq.write_table(table, out / "metadata" / f"metadata_{part}.parquet")
    for modality, (factory, search_params) in (indexes or {}).items():
        vectors = arrays[modality][1].astype(np.float32)
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        faiss.write_index(index, str(out / f"{modality}.index"))
        info = {"factory": factory, "count": count, "dim": vectors.shape[1], "search_params": search_params}
        (out / f"{modality}.index.json").write_text(json.dumps(info))
    manifest = {"format": "clipforge-embeddings", "version": 1,
                "model": {"spec": "tiny-vit (fixture)", "fingerprint": model_fingerprint(model)},
                "modalities": list(modalities), "dim": model.config.embed_dim, "count": count,
                "parts": list(range(len(parts))), "skipped": [], "complete": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@dataclass
class SearchFixture:
    """Two collections (``shapes``: image+text, Flat + HNSW; ``imageonly``: no index files) and the model."""

    root: Path
    model: torch.nn.Module
    model_dir: Path
    rows: Rows
    shapes: Path
    imageonly: Path


def build_search_fixture(root: Path) -> SearchFixture:
    """Write images, the saved model and both collections under ``root``."""
    model = fixture_model()
    model_dir = clipforge.save(model, root / "model")
    rows = write_images(root)
    shapes = write_collection(root / "shapes", model, rows,
                              indexes={"image": ("Flat", ""), "text": ("HNSW16", "efSearch=64")})
    imageonly = write_collection(root / "imageonly", model, rows, modalities=("image",))
    return SearchFixture(root, model, model_dir, rows, shapes, imageonly)


class LiveServer:
    """A uvicorn server for ``app`` on a free 127.0.0.1 port, run in a thread until ``stop()``."""

    def __init__(self, app):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def start_server(fixture: SearchFixture, **app_options) -> LiveServer:
    """Serve both fixture collections with the fixture model, batched through a QueryEncoder."""
    from clipforge.search._batcher import QueryEncoder
    from clipforge.search.collection import load_collections
    from clipforge.search.service import create_app

    collections = load_collections([fixture.shapes, fixture.imageonly])
    encoder = QueryEncoder(fixture.model, "cpu", "fp32", wait_ms=3.0)
    preprocess = clipforge.image_transform(fixture.model.config.vision.image_size)
    from clipforge.search._guard import LOOPBACK_HOSTS

    app_options.setdefault("allowed_hosts", LOOPBACK_HOSTS)
    return LiveServer(create_app(collections, encoder, preprocess, **app_options))
