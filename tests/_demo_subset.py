"""A few rows of the prepared demo data, for tests that train and evaluate on real images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clipforge.runtime import cache_root

DEMO = cache_root() / "demo" / "data-64px"


def demo_subset(root: Path, train_rows: int, heldout_rows: int, fluent_classes: int) -> dict[str, Path]:
    """``{"train", "heldout", "fluent", "root"}``: the first rows of the demo's training and held-out
    listings (image paths made absolute) and its first Fluent 3D class folders, under ``root``;
    skips the test when the demo data is not prepared."""
    if not (DEMO / "train.jsonl").is_file():
        pytest.skip(f"demo data not prepared under {DEMO}; run: clipforge demo --prepare-only")

    def absolute(name: str, rows: int) -> Path:
        records = [json.loads(line) for line in (DEMO / name).read_text(encoding="utf-8").splitlines()[:rows]]
        for record in records:
            record["image"] = str(DEMO / record["image"])
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return root / name

    fluent = root / "fluent"
    for folder in sorted(p for p in (DEMO / "eval" / "fluent3d").iterdir() if p.is_dir())[:fluent_classes]:
        shutil.copytree(folder, fluent / folder.name)
    return {"train": absolute("train.jsonl", train_rows), "heldout": absolute("heldout.jsonl", heldout_rows),
            "fluent": fluent, "root": root}
