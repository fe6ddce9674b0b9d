"""Embed a collection of images (and their captions) into clip-retrieval's folder layout.

    from clipforge.search import embed_collection
    manifest = embed_collection("photos/", "photos-emb/", model="ckpt/")   # or a CLIP instance

SOURCE is an image folder, a CSV/TSV/JSONL listing or WebDataset shards (see ``_sources``); OUT
gets ``img_emb/``, ``text_emb/``, ``metadata/`` and ``manifest.json`` (see ``_parts``).

- Parts are the unit of work and of resumption: a run continues after the last complete part, and
  a part is always computed from its first input with the same batches, so a resumed output equals
  an uninterrupted one byte for byte (same model, batch size, device and thread count).
- A complete part is kept only while its inputs are what was embedded (``_fingerprints``: size and
  content digest, not the modification time alone): a folder or listing part whose files were
  edited, added, removed or shifted between parts, or a local shard that changed, is embedded again
  (so is every part of a folder an older clipforge wrote).
- Under ``torchrun`` part ``n`` goes to rank ``n % WORLD_SIZE``; every rank writes its own parts,
  no collective is needed, and whichever rank finds every part done writes the final manifest.
- DataLoader workers read and decode; an input that cannot be read or decoded (missing, truncated,
  not an image) is skipped for both modalities, so image and text rows stay aligned, and is listed
  in the manifest with its reason. PIL decodes fully (``load()``) and refuses truncated files.
- A row without a caption gets the embedding of the empty text (its ``caption`` is null).
"""
from __future__ import annotations

import io
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import _fingerprints, _parts
from ._sources import FileSource, Record, Source, open_source

# Test hook: the process SIGKILLs itself right after committing this part (resume tests).
KILL_AFTER_PART_ENV = "CLIPFORGE_TEST_KILL_AFTER_PART"


class BadImage(Exception):
    """An input whose image cannot be used; the message is the reason listed in the manifest."""


def read_image_bytes(record: Record) -> tuple[bytes, dict]:
    """The record's encoded image and the fingerprint of those bytes; BadImage says why not."""
    if record.image is None:
        raise BadImage(record.error or "no image")
    if isinstance(record.image, bytes):
        return record.image, _fingerprints.of_bytes(record.image, record.mtime_ns)
    try:
        mtime_ns = os.stat(record.image).st_mtime_ns  # taken before the read: a change during it shows later
        data = Path(record.image).read_bytes()
    except OSError as err:
        raise BadImage(f"cannot read image file: {err.strerror or err}") from None
    return data, _fingerprints.of_bytes(data, mtime_ns)


def decode_image(data: bytes):
    """``data`` as a fully decoded RGB PIL image; BadImage says why not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode every byte now: a truncated file fails here instead of hanging later
            return image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None


@dataclass
class _Batch:
    """Up to batch-size decoded inputs of one chunk of a part; ``last`` closes the chunk."""

    part: int
    chunk: int                   # position of the chunk in the part (chunks decode in parallel)
    pixels: torch.Tensor | None  # (B, 3, H, W), None when every input of this batch was bad
    rows: list[dict]             # per pixel row: image_path, captions, meta
    skipped: list[dict]          # {"input", "reason"} of the inputs dropped since the previous batch
    seen: list[dict]             # {"input", "kept", "fingerprint"} of every input read for this batch
    last: bool

    @property
    def inputs(self) -> int:
        """Inputs read for this batch, good and bad (for the progress bar)."""
        return len(self.seen)


class _PartBatches(IterableDataset):
    """Batches of the given parts' chunks; DataLoader worker w decodes every num_workers-th chunk.

    Folders and listings cut a part into chunks of one batch, so every worker helps with every
    part; a shard is one chunk (a stream). Batch boundaries depend only on the input positions,
    never on which worker decoded what, so results do not depend on the worker count.
    """

    def __init__(self, source: Source, work: list[tuple[int, int, range | None]], preprocess: Callable,
                 batch_size: int):
        self.source, self.work, self.preprocess, self.batch_size = source, work, preprocess, batch_size

    def __iter__(self) -> Iterator[_Batch]:
        worker = get_worker_info()
        mine = self.work if worker is None else self.work[worker.id::worker.num_workers]
        for part, chunk, rows in mine:
            yield from self._chunk_batches(part, chunk, rows)

    def _chunk_batches(self, part: int, chunk: int, rows: range | None) -> Iterator[_Batch]:
        pixels, kept, skipped, seen = [], [], [], []
        for record in self.source.records(part, rows):
            fingerprint = None
            try:
                data, fingerprint = read_image_bytes(record)
                pixels.append(self.preprocess(decode_image(data)))
            except BadImage as err:
                skipped.append({"input": record.key, "reason": str(err)})
                seen.append({"input": record.key, "kept": False, "fingerprint": fingerprint})
                continue
            kept.append({"image_path": record.image_path, "captions": record.captions, "meta": record.meta})
            seen.append({"input": record.key, "kept": True, "fingerprint": fingerprint})
            if len(pixels) == self.batch_size:
                yield _Batch(part, chunk, torch.stack(pixels), kept, skipped, seen, last=False)
                pixels, kept, skipped, seen = [], [], [], []
        yield _Batch(part, chunk, torch.stack(pixels) if pixels else None, kept, skipped, seen, last=True)


def _keep(batch):
    return batch  # batches are made in the workers already


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers only decode; leave the cores to the model


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the process group if any, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    from ..distributed import world_info

    rank, world = world_info()
    if world == 1:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world


def _resolve_model(model, preprocess, device):
    """``(model, preprocess, spec)`` for a CLIP instance or a checkpoint path that clipforge.load reads."""
    from ..checkpoints import load
    from ..transforms import image_transform

    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        model, loaded_preprocess = load(spec, device=device)
        return model.eval(), preprocess or loaded_preprocess, spec
    model = model.to(device).eval()
    return model, preprocess or image_transform(model.config.vision.image_size), None


def _resolve_modalities(modalities, source: Source) -> list[str]:
    if modalities is None:
        return ["image", "text"] if source.has_captions else ["image"]
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    modalities = [name.strip() for item in modalities for name in item.split(",") if name.strip()]
    unknown = [name for name in modalities if name not in ("image", "text")]
    if unknown or "image" not in modalities:
        raise ValueError(f"modalities must be image or image,text (rows are images), got {','.join(modalities)!r}")
    if "text" in modalities and not source.has_captions:
        raise ValueError(f"{source.description}: no captions found, so there is no text to embed; "
                         "use --modalities image")
    return sorted(set(modalities), key=("image", "text").index)


class _Encoder:
    """The model on its device under the chosen precision: pixels and texts to float16 unit rows."""

    def __init__(self, model, device: torch.device, precision: str):
        from ..runtime import autocast, check_precision

        check_precision(precision)
        self.model, self.device, self.precision, self._autocast = model, device, precision, autocast

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)  # (B, dim), unit rows in fp32
        return features.cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def images(self, pixels: torch.Tensor) -> np.ndarray:
        with self._autocast(self.device, self.precision):
            return self._finish(self.model.encode_image(pixels.to(self.device, non_blocking=True)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        from ..tokenizer import tokenize

        tokens = tokenize(texts, context_length=self.model.context_length, truncate=True)
        with self._autocast(self.device, self.precision):
            return self._finish(self.model.encode_text(tokens.to(self.device)))


def embed_collection(source: str | os.PathLike, out: str | os.PathLike, model, preprocess: Callable | None = None,
                     *, modalities=None, batch_size: int = 256, num_workers: int = 4, precision: str = "fp32",
                     device: str | torch.device = "auto", part_size: int = 10000,
                     image_root: str | os.PathLike | None = None, model_spec: str | None = None,
                     progress: bool = True) -> dict:
    """Embed SOURCE into OUT (module docstring) and return the manifest as written.

    ``model`` is a :class:`clipforge.CLIP` or a checkpoint path that ``clipforge.load`` reads;
    ``preprocess`` defaults to the model's eval transform. ``modalities`` is ``"image"`` or
    ``"image,text"`` (default: both when the source has captions). ``part_size`` is rows per part
    for folders and listings (shards give one part each). ``model_spec`` names the model in the
    manifest. Runs again on the same OUT continue after its complete parts; a folder made by a
    different model, source, part size, modality set or precision is refused with ``ValueError``.
    """
    from ..evaluate import model_fingerprint
    from ..runtime import check_precision, resolve_device

    check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out)
    rank, world = rank_and_world()
    device = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    collection = open_source(source, part_size=part_size, image_root=image_root)
    modalities = _resolve_modalities(modalities, collection)
    model, preprocess, loaded_spec = _resolve_model(model, preprocess, device)
    run = {"model": {"spec": model_spec or loaded_spec, "fingerprint": model_fingerprint(model)},
           "source": collection.description, "num_parts": collection.num_parts,
           "part_size": part_size if isinstance(collection, FileSource) else None,
           "modalities": modalities, "precision": precision, "version": _parts.VERSION}
    out.mkdir(parents=True, exist_ok=True)
    _parts.require_pyarrow()
    _parts.check_run(out, run)
    dim = int(model.config.embed_dim)
    mine = _pending_parts(collection, out, range(rank, collection.num_parts, world), progress)
    if rank == 0:
        _parts.write_manifest(out, run, collection.num_parts, dim, modalities)
    if mine:
        _embed_parts(collection, out, mine, _Encoder(model, device, precision), preprocess, modalities,
                     batch_size, num_workers, progress and rank == 0)
    if all(_parts.read_marker(out, part) is not None for part in range(collection.num_parts)):
        return _parts.write_manifest(out, run, collection.num_parts, dim, modalities)
    return {**run, "complete": False}  # another rank still works; it writes the final manifest


def _pending_parts(collection: Source, out: Path, parts: range, progress: bool) -> list[int]:
    """Those of ``parts`` to embed: not complete, or complete but written by an older version or made
    from inputs that changed since (whose markers are removed here, so a kill while redoing them
    leaves them incomplete)."""
    pending, changed = [], []
    for part in parts:
        marker = _parts.read_marker(out, part)
        if marker is not None and (marker.get("version", 1) != _parts.VERSION  # an older folder's part
                                   or not _inputs_unchanged(collection, out, part, marker)):
            _parts.remove_marker(out, part)
            changed.append(part)
            marker = None
        if marker is None:
            pending.append(part)
    if changed and progress:
        listed = ", ".join(map(str, changed[:10])) + (", ..." if len(changed) > 10 else "")
        print(f"embed: {len(changed)} complete part(s) ({listed}) changed since they were embedded (their inputs, "
              "or an older clipforge wrote them); embedding them again", file=sys.stderr)
    return pending


def _inputs_unchanged(collection: Source, out: Path, part: int, marker: dict) -> bool:
    """Whether complete part ``part`` was made from the inputs the source gives now, as they are now."""
    if not isinstance(collection, FileSource):  # a shard: the file as a whole (a remote one: trusted)
        return _fingerprints.unchanged(marker.get("shard"), collection.part_fingerprint(part))
    recorded = _parts.read_inputs(out, part)
    records = list(collection.records(part))
    if recorded is None or [entry["input"] for entry in recorded] != [record.key for record in records]:
        return False
    now = _fingerprints.of_files(record.image if isinstance(record.image, str) else None for record in records)
    return all(_fingerprints.unchanged(_fingerprints.from_row(entry), current)
               for entry, current in zip(recorded, now))


def _embed_parts(collection: Source, out: Path, parts: list[int], encoder: _Encoder, preprocess: Callable,
                 modalities: list[str], batch_size: int, num_workers: int, progress: bool) -> None:
    """Run the pending ``parts`` through the model, writing each as soon as its last batch is in."""
    from tqdm import tqdm

    work = [(part, chunk, rows) for part in parts for chunk, rows in enumerate(collection.chunks(part, batch_size))]
    chunks_left = {part: sum(1 for item in work if item[0] == part) for part in parts}
    workers = min(num_workers, len(work))
    loader = DataLoader(_PartBatches(collection, work, preprocess, batch_size), batch_size=None, collate_fn=_keep,
                        num_workers=workers, worker_init_fn=_worker_init if workers else None,
                        pin_memory=encoder.device.type == "cuda")
    counts = [collection.part_inputs(part) for part in parts]
    shards = {part: collection.part_fingerprint(part) for part in parts}  # before reading: a change shows later
    total = None if None in counts else sum(counts)
    kill_after = os.environ.get(KILL_AFTER_PART_ENV)
    open_parts: dict[int, dict] = {}  # part -> {(chunk, batch number): encoded batch} until all its chunks are in
    with tqdm(total=total, unit="img", desc="embed", file=sys.stderr, disable=not progress, smoothing=0.1) as bar:
        for batch in loader:
            received = open_parts.setdefault(batch.part, {})
            encoded = {"rows": batch.rows, "skipped": batch.skipped, "seen": batch.seen}
            if batch.pixels is not None:
                encoded["image"] = encoder.images(batch.pixels)
                if "text" in modalities:
                    encoded["text"] = encoder.texts([r["captions"][0] if r["captions"] else "" for r in batch.rows])
            received[(batch.chunk, len([key for key in received if key[0] == batch.chunk]))] = encoded
            bar.update(batch.inputs)
            chunks_left[batch.part] -= batch.last
            if chunks_left[batch.part] == 0:
                in_order = [received[key] for key in sorted(received)]
                _write(out, batch.part, in_order, collection, modalities, int(encoder.model.config.embed_dim),
                       shards[batch.part])
                del open_parts[batch.part]
                if kill_after is not None and int(kill_after) == batch.part:
                    os.kill(os.getpid(), signal.SIGKILL)


def _write(out: Path, part: int, batches: list[dict], collection: Source, modalities: list[str], dim: int,
           shard: dict | None) -> None:
    """Concatenate a part's encoded batches (in input order) and write the part."""
    rows = [row for batch in batches for row in batch["rows"]]
    skipped = [entry for batch in batches for entry in batch["skipped"]]
    inputs, row = [], 0
    for entry in (entry for batch in batches for entry in batch["seen"]):  # kept ones in metadata row order
        fingerprint = entry["fingerprint"] or {"size": None, "mtime_ns": None, "digest": None}
        inputs.append({"input": entry["input"], "row": row if entry["kept"] else None, **fingerprint})
        row += entry["kept"]
    embeddings = {}
    for modality in modalities:
        arrays = [batch[modality] for batch in batches if modality in batch]
        embeddings[modality] = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float16)
    multi = collection.multi_caption if isinstance(collection, FileSource) else \
        any(len(row["captions"]) > 1 for row in rows)
    _parts.write_part(out, part, embeddings, rows, skipped, multi, rank=rank_and_world()[0], inputs=inputs,
                      shard=shard)
