"""Search a collection by text and by image: embed it, index it with FAISS, serve it over HTTP.

``embed.py`` writes clip-retrieval's layout (parts of float16 embeddings, parquet metadata, a
manifest), ``index.py`` builds FAISS indexes tuned to a recall target, ``collection.py`` reads a
collection, ``service.py`` is the HTTP service with its page (``page/``).

    from clipforge.search import embed_collection, build_index
    embed_collection("photos/", "photos-emb/", model="ckpt/")
    build_index("photos-emb/", memory="4GiB")

Names are imported on first use, so ``import clipforge.search`` works without faiss or pyarrow.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "embed_collection": ".embed",
    "build_index": ".index",
    "choose_factory": "._factory",
    "parse_memory": "._factory",
    "read_embedding_manifest": ".stored",
    "stored_image_embeddings": ".stored",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
