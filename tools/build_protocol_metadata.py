"""Rebuild the ImageNet-family wnid tables in src/clipforge/evaluate/metadata/ from downloaded wheels.

    pip download timm==1.0.31 --no-deps -d /tmp/timm
    pip download clip_benchmark==1.6.2 --no-deps -d /tmp/cb
    python tools/build_protocol_metadata.py /tmp/timm/timm-1.0.31-py3-none-any.whl \
        /tmp/cb/clip_benchmark-1.6.2-py2.py3-none-any.whl

timm (Apache-2.0) ships the 1,000 ImageNet-1k wnids in class order and the 200-class subsets of
ImageNet-R and ImageNet-A; clip_benchmark (MIT) holds the same three lists in
``clip_benchmark/datasets/builder.py`` plus ImageNet-O's 200 wnids. The lists are cross-checked
(the script stops if the two sources disagree) and written one wnid per line.
"""
from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "evaluate" / "metadata"
TIMM_FILES = {"imagenet_wnids.txt": "timm/data/_info/imagenet_synsets.txt",
              "imagenet_r_wnids.txt": "timm/data/_info/imagenet_r_synsets.txt",
              "imagenet_a_wnids.txt": "timm/data/_info/imagenet_a_synsets.txt"}
BUILDER_NAMES = {"imagenet_wnids.txt": "all_imagenet_wordnet_ids", "imagenet_r_wnids.txt": "imagenet_r_wnids",
                 "imagenet_a_wnids.txt": "imagenet_a_wnids", "imagenet_o_wnids.txt": "imagenet_o_wnids"}


def builder_lists(wheel: Path) -> dict[str, list[str]]:
    """The wnid lists assigned by name in clip_benchmark's builder.py (sets sorted)."""
    with zipfile.ZipFile(wheel) as archive:
        tree = ast.parse(archive.read("clip_benchmark/datasets/builder.py").decode())
    wanted = set(BUILDER_NAMES.values())
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in wanted):
            value = ast.literal_eval(node.value)
            found[node.targets[0].id] = list(value) if isinstance(value, list) else sorted(value)
    return found


def main(timm_wheel: str, clip_benchmark_wheel: str) -> None:
    """Write the four tables after checking both sources agree."""
    from_builder = builder_lists(Path(clip_benchmark_wheel))
    with zipfile.ZipFile(timm_wheel) as archive:
        from_timm = {name: archive.read(member).decode().split() for name, member in TIMM_FILES.items()}
    for name, wnids in from_timm.items():
        other = from_builder[BUILDER_NAMES[name]]
        if sorted(other) != sorted(wnids) or (name == "imagenet_wnids.txt" and other != wnids):
            sys.exit(f"{name}: timm and clip_benchmark disagree")
    tables = {**from_timm, "imagenet_o_wnids.txt": sorted(from_builder["imagenet_o_wnids"])}
    assert tables["imagenet_wnids.txt"] == sorted(tables["imagenet_wnids.txt"]) and len(tables["imagenet_wnids.txt"]) == 1000
    for name, wnids in tables.items():
        assert len(set(wnids)) == len(wnids) and set(wnids) <= set(tables["imagenet_wnids.txt"]), name
        (OUT / name).write_text("\n".join(wnids) + "\n", encoding="utf-8")
        print(f"wrote {OUT / name}: {len(wnids)} wnids")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
