"""The demo's last step: its held-out pairs and Fluent 3D images embedded and indexed for search.

With the model just trained, ``clipforge embed`` and ``clipforge index``'s library calls write two
collections under ``run_dir/search/``; ``clipforge serve`` (or ``clipforge demo --serve``) opens
them in a browser. Skipped, with one line, when the ``search`` extra is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

from ..runtime import log_progress as _log


def index_demo_collections(run_dir: str | os.PathLike, dataset, device: str = "cpu",
                           progress: bool = True) -> dict:
    """Embed and index ``heldout`` (image-caption pairs) and ``fluent3d`` (eval images); returns what
    results.json records: the collection folders and the ``clipforge serve`` command."""
    missing = [name for name in ("faiss", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        _log(progress, f"demo: search index skipped ({', '.join(missing)} missing: pip install 'clipforge[search]')")
        return {}
    from ..checkpoints import load
    from ..search import build_index, embed_collection

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    model, preprocess = load(model_dir, device=device)
    collections = {"heldout": dataset.heldout_captions, "fluent3d": dataset.eval_dir}
    folders = []
    for name, source in collections.items():
        out = run_dir / "search" / name
        embed_collection(source, out, model, preprocess, device=device, num_workers=0, model_spec=str(model_dir),
                         progress=False)
        build_index(out, memory="1GiB", progress=False)
        folders.append(str(out))
    command = shlex.join(["clipforge", "serve", *folders, "--model", str(model_dir)])
    _log(progress, f"demo: search collections ready; browse them with: {command}")
    return {"collections": folders, "serve": command}
