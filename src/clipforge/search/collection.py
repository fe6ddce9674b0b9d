"""Read an embedded collection folder (clip-retrieval's layout) and search it.

A collection folder ``OUT`` holds::

    img_emb/img_emb_{N}.npy      float16, L2-normalised image embeddings, part N (0, 1, 2, ...)
    text_emb/text_emb_{N}.npy    the same for captions (absent for an image-only collection)
    metadata/metadata_{N}.parquet   one row per embedding: image_path, caption, extra columns
    manifest.json                model spec and fingerprint, modalities, dim, count
    image.index, text.index      FAISS indexes (optional) with image.index.json / text.index.json

Row ``i`` across the parts (in increasing N, rows in file order) is FAISS id ``i`` and metadata row
``i``. A missing index file means exact search: an in-memory ``IndexFlatIP`` over the embeddings.

Which files may be served (``/image/{id}``, ``/thumb/{id}``): a request names an id, never a path;
the path is the id's ``image_path`` in the collection's own metadata (written by ``clipforge embed``,
so trusted; a relative path is taken under the collection folder). It is served only when it
resolves (symlinks followed) to a regular file inside the resolved *image root*, the deepest folder
holding every indexed image, and PIL recognises it as an image (the service checks that). So a
symlink in the image folder pointing outside it is refused, as is an indexed file since replaced by
something that is not an image.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODALITIES = ("image", "text")
_PART_FOLDERS = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}


@dataclass
class SearchIndex:
    """One modality's FAISS index (searched concurrently: FAISS search is read-only) and its info JSON."""

    index: object
    info: dict
    exact: bool


def _numbered_parts(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """``folder/prefix_{N}suffix`` files sorted by N as a number (so 10 comes after 9)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    numbered = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = pattern.match(path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    return [path for _, path in sorted(numbered)]


class EmbeddingParts:
    """One modality's ``{prefix}_{N}.npy`` parts, memory-mapped (float16 stays on disk until rows are read)."""

    def __init__(self, parts: list[Path]):
        self.arrays = []
        for path in parts:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.ndim != 2:
                raise ValueError(f"{path}: expected a 2-D (rows, dim) array, got shape {array.shape}")
            self.arrays.append(array)
        dims = {array.shape[1] for array in self.arrays}
        if len(dims) != 1:
            raise ValueError(f"{parts[0].parent}: parts disagree on the embedding dim: {sorted(dims)}")
        self.dim = dims.pop()
        self.starts = np.cumsum([0] + [len(array) for array in self.arrays])  # (parts + 1,)
        self.count = int(self.starts[-1])

    def rows(self, ids) -> np.ndarray:
        """``(len(ids), dim)`` float32 rows by global id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.starts, ids, side="right") - 1
        for part in np.unique(part_of):
            mask = part_of == part
            out[mask] = self.arrays[part][ids[mask] - self.starts[part]]
        return out

    def chunks(self, rows: int = 65536):
        """The rows in order as float32 blocks of at most ``rows``."""
        for array in self.arrays:
            for start in range(0, len(array), rows):
                yield np.asarray(array[start:start + rows], dtype=np.float32)


def _read_embeddings(root: Path, modality: str) -> EmbeddingParts | None:
    """The modality's parts, or None when its folder holds none."""
    folder_name, prefix = _PART_FOLDERS[modality]
    parts = _numbered_parts(root / folder_name, prefix, ".npy")
    return EmbeddingParts(parts) if parts else None


def _read_metadata(root: Path):
    """All metadata parts concatenated into one pyarrow Table (row i = FAISS id i)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = _numbered_parts(root / "metadata", "metadata", ".parquet")
    if not parts:
        raise FileNotFoundError(f"{root / 'metadata'}: no metadata_{{N}}.parquet parts")
    tables = [pq.read_table(path) for path in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def _load_index(root: Path, modality: str, embeddings: EmbeddingParts) -> SearchIndex:
    """``{modality}.index`` with its search parameters applied, else exact search over the embeddings."""
    import faiss

    path = root / f"{modality}.index"
    if not path.is_file():
        index = faiss.IndexFlatIP(embeddings.dim)
        for block in embeddings.chunks():
            index.add(block)
        return SearchIndex(index, {"factory": "Flat", "count": embeddings.count, "dim": embeddings.dim,
                                   "search_params": "", "source": "in-memory exact search"}, exact=True)
    info_path = root / f"{modality}.index.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    index = faiss.read_index(str(path))
    if index.ntotal != embeddings.count or index.d != embeddings.dim:
        raise ValueError(f"{path}: holds {index.ntotal} vectors of dim {index.d}, but the embeddings are "
                         f"{embeddings.count} x {embeddings.dim}; rebuild it with clipforge index")
    params = info.get("search_params") or ""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return SearchIndex(index, info, exact=False)


class Collection:
    """An embedded, optionally indexed collection read from disk; thread-safe for searching."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{folder}: not a collection folder (run clipforge embed first)")
        self.name = self.root.name
        manifest_path = self.root / "manifest.json"  # absent in clip-retrieval's own output: allowed
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        self.metadata = _read_metadata(self.root)
        self.embeddings: dict[str, EmbeddingParts] = {}
        for modality in MODALITIES:
            parts = _read_embeddings(self.root, modality)
            if parts is None:
                continue
            if parts.count != self.metadata.num_rows:
                raise ValueError(f"{self.root}: {parts.count} {modality} embeddings but "
                                 f"{self.metadata.num_rows} metadata rows; the collection is incomplete")
            self.embeddings[modality] = parts
        if not self.embeddings:
            raise FileNotFoundError(f"{self.root}: no img_emb/img_emb_N.npy or text_emb/text_emb_N.npy parts")
        dims = {parts.dim for parts in self.embeddings.values()}
        if len(dims) != 1:
            raise ValueError(f"{self.root}: image and text embeddings have different dims {sorted(dims)}")
        self.dim = dims.pop()
        self.count = self.metadata.num_rows
        self.indexes = {modality: _load_index(self.root, modality, parts)
                        for modality, parts in self.embeddings.items()}
        self._image_paths = self.metadata.column("image_path") if "image_path" in self.metadata.column_names else None
        self.image_root = self._image_root()

    @property
    def modalities(self) -> list[str]:
        """The modalities with embeddings, in ``("image", "text")`` order."""
        return list(self.embeddings)

    def _image_root(self) -> Path | None:
        """The resolved deepest folder holding every indexed image (None when no row has a path)."""
        import pyarrow.compute as pc

        if self._image_paths is None:
            return None
        # the distinct folders (few, even for millions of rows), without a Python string per row
        paths = self._image_paths.drop_null()
        paths = paths.filter(pc.not_equal(paths, ""))
        folders = pc.unique(pc.replace_substring_regex(paths, r"[^/]*$", "")).to_pylist()
        folders = [os.path.dirname(os.path.normpath(self._absolute(folder + "x"))) for folder in folders]
        if not folders:
            return None
        return Path(os.path.realpath(os.path.commonpath(folders)))

    def _absolute(self, path: str) -> str:
        return path if os.path.isabs(path) else str(self.root / path)

    def search(self, queries: np.ndarray, modality: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(len(queries), min(k, count))``, of ``modality``'s nearest rows.

        ``queries`` is ``(B, dim)``; they are L2-normalised here. A row may end in ids of -1 when an
        approximate index finds fewer than ``k`` hits (FAISS's convention); callers drop them.
        """
        self.check_query(queries, modality)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (B, dim)
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1, norms)
        k = max(1, min(int(k), self.count))
        search_index = self.indexes[modality]
        return search_index.index.search(queries, k)

    def check_query(self, queries: np.ndarray, modality: str) -> None:
        """``ValueError`` unless ``modality`` has an index here and ``queries`` end in this collection's dim."""
        if modality not in self.indexes:
            raise ValueError(f"collection {self.name!r} has no {modality} embeddings "
                             f"(it has: {', '.join(self.modalities)})")
        if np.shape(queries)[-1] != self.dim:
            raise ValueError(f"query has dim {np.shape(queries)[-1]}, collection {self.name!r} has dim {self.dim}")

    def vectors(self, ids, modality: str) -> np.ndarray:
        """The stored embeddings of ``ids`` as ``(len(ids), dim)`` float32."""
        return self.embeddings[modality].rows(ids)

    def check_id(self, row_id) -> int:
        """``row_id`` as an int, or ``KeyError`` naming it unless ``0 <= id < count``."""
        if isinstance(row_id, bool) or not isinstance(row_id, (int, np.integer)):
            raise KeyError(f"id must be an integer, got {row_id!r}")
        if not 0 <= int(row_id) < self.count:
            raise KeyError(f"id {row_id} is out of range: collection {self.name!r} has ids 0..{self.count - 1}")
        return int(row_id)

    def rows(self, ids) -> list[dict]:
        """The metadata rows of ``ids`` as dicts (every column), in the order given."""
        ids = [self.check_id(row_id) for row_id in ids]
        return self.metadata.take(np.asarray(ids, dtype=np.int64)).to_pylist() if ids else []

    def image_file(self, row_id) -> Path | None:
        """The file of id ``row_id`` if it may be served (see the module docstring), else None."""
        row_id = self.check_id(row_id)
        path = self._image_paths[row_id].as_py() if self._image_paths is not None else None
        if not path or self.image_root is None:
            return None
        resolved = Path(os.path.realpath(self._absolute(path)))
        if not resolved.is_relative_to(self.image_root) or not resolved.is_file():
            return None
        return resolved

    def describe(self) -> dict:
        """A JSON-able summary: name, count, dim, modalities, model, index types."""
        return {"name": self.name, "count": self.count, "dim": self.dim, "modalities": self.modalities,
                "model": self.manifest.get("model", {}),
                "indexes": {modality: {"factory": index.info.get("factory", "?"), "exact": index.exact,
                                       "search_params": index.info.get("search_params", "")}
                            for modality, index in self.indexes.items()}}


def load_collections(folders) -> dict[str, Collection]:
    """Collections by name (the folder's name); two folders of the same name are an error."""
    collections: dict[str, Collection] = {}
    for folder in folders:
        collection = Collection(folder)
        if collection.name in collections:
            raise ValueError(f"two collections are named {collection.name!r} ({collections[collection.name].root} "
                             f"and {collection.root}); the folder name is the indice_name, rename one")
        collections[collection.name] = collection
    return collections
