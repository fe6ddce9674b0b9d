"""Rebuild classnames.json and templates.json from their published sources (see SOURCES.md).

Not imported by clipforge; run by hand when the sources change::

    pip download --no-deps clip_benchmark==1.6.2 -d /tmp/cb
    python tools/build_eval_metadata.py \\
        --prompts-md CLIP/data/prompts.md \\
        --clip-benchmark-wheel /tmp/cb/clip_benchmark-1.6.2-py2.py3-none-any.whl \\
        --open-clip-metadata .../site-packages/open_clip/zero_shot_metadata.py

OpenAI's lists (data/prompts.md of the openai/CLIP repository, and its ImageNet notebook as
copied into open_clip) win; clip_benchmark adds the datasets OpenAI did not publish. Templates
are stored with OpenAI's ``{}`` placeholder.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import runpy
import zipfile
from pathlib import Path

# Section title in prompts.md -> the dataset key (CLIP_benchmark's names where it has one).
OPENAI_SECTIONS = {
    "Birdsnap": "birdsnap", "CIFAR10": "cifar10", "CIFAR100": "cifar100",
    "CLEVRCounts": "clevr_count_all", "Caltech101": "caltech101", "Country211": "country211",
    "DescribableTextures": "dtd", "EuroSAT": "eurosat", "FGVCAircraft": "fgvc_aircraft",
    "FacialEmotionRecognition2013": "fer2013", "Flowers102": "flowers", "Food101": "food101",
    "GTSRB": "gtsrb", "HatefulMemes": "hateful_memes", "KITTI": "kitti_closest_vehicle_distance",
    "Kinetics700": "kinetics700", "MNIST": "mnist", "OxfordPets": "pets",
    "PascalVOC2007": "voc2007", "PatchCamelyon": "pcam", "RESISC45": "resisc45",
    "SST2": "renderedsst2", "STL10": "stl10", "SUN397": "sun397", "StanfordCars": "cars",
    "UCF101": "ucf101",
}
# clip_benchmark entries that are not single-label class lists.
SKIP_CLIP_BENCHMARK = {"dummy", "voc2007_multilabel"}


def parse_prompts_md(text: str) -> dict[str, tuple[list, list[str]]]:
    """``{key: (classes, templates)}`` from prompts.md's ``## Title`` + code-block sections."""
    sections = {}
    for match in re.finditer(r"^## (\S+)\s*\n+```\w*\n(.*?)```", text, flags=re.M | re.S):
        title, body = match.group(1), match.group(2)
        if title not in OPENAI_SECTIONS:
            raise ValueError(f"prompts.md: unknown section {title!r}; add it to OPENAI_SECTIONS")
        values = {}
        for assignment in ast.parse(body).body:  # classes = [...]; templates = [...]
            values[assignment.targets[0].id] = ast.literal_eval(assignment.value)
        sections[OPENAI_SECTIONS[title]] = (values["classes"], values["templates"])
    missing = set(OPENAI_SECTIONS.values()) - set(sections)
    if missing:
        raise ValueError(f"prompts.md: sections not found for {sorted(missing)}")
    return sections


def read_clip_benchmark(wheel: Path) -> tuple[dict, dict]:
    """English classnames and templates packaged in a clip_benchmark wheel."""
    with zipfile.ZipFile(wheel) as archive:
        classnames = json.loads(archive.read("clip_benchmark/datasets/en_classnames.json"))
        templates = json.loads(archive.read("clip_benchmark/datasets/en_zeroshot_classification_templates.json"))
    return classnames, {name: [t.replace("{c}", "{}") for t in ts] for name, ts in templates.items()}


def read_open_clip_imagenet(path: Path) -> tuple[list[str], list[str], list[str]]:
    """ImageNet classnames, the 80 OpenAI templates and the 7-template subset from open_clip."""
    module = runpy.run_path(str(path))
    templates = [template("{}") for template in module["OPENAI_IMAGENET_TEMPLATES"]]
    simple = [template("{}") for template in module["SIMPLE_IMAGENET_TEMPLATES"]]
    return list(module["IMAGENET_CLASSNAMES"]), templates, simple


def build(prompts_md: Path, wheel: Path, open_clip_metadata: Path) -> tuple[dict, dict, list[str]]:
    """Merged ``(classnames, templates, notes)``; notes list where the sources disagree."""
    openai = parse_prompts_md(prompts_md.read_text(encoding="utf-8"))
    cb_classnames, cb_templates = read_clip_benchmark(wheel)
    imagenet_classes, imagenet_templates, imagenet_simple = read_open_clip_imagenet(open_clip_metadata)
    notes = []
    if imagenet_classes != cb_classnames["imagenet1k"]:
        notes.append("imagenet1k: open_clip and clip_benchmark classnames differ; open_clip's kept")
    classnames = {"imagenet1k": imagenet_classes}
    templates = {"imagenet1k": imagenet_templates, "imagenet1k_simple": imagenet_simple}
    for key, (classes, prompts) in openai.items():
        classnames[key], templates[key] = classes, prompts
        if key in cb_classnames and cb_classnames[key] != classes:
            notes.append(f"{key}: clip_benchmark's classnames differ (order or wording); OpenAI's kept")
        if key in cb_templates and cb_templates[key] != prompts:
            notes.append(f"{key}: clip_benchmark's templates differ; OpenAI's kept")
    for key in sorted(set(cb_classnames) | set(cb_templates)):
        if key in SKIP_CLIP_BENCHMARK or key in templates:
            continue
        if key in cb_classnames:
            classnames[key] = cb_classnames[key]
        if key in cb_templates:
            templates[key] = cb_templates[key]
    return dict(sorted(classnames.items())), dict(sorted(templates.items())), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts-md", type=Path, required=True)
    parser.add_argument("--clip-benchmark-wheel", type=Path, required=True)
    parser.add_argument("--open-clip-metadata", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "clipforge" / "evaluate" / "metadata")
    args = parser.parse_args()
    classnames, templates, notes = build(args.prompts_md, args.clip_benchmark_wheel, args.open_clip_metadata)
    for name, data in (("classnames.json", classnames), ("templates.json", templates)):
        with open(args.out / name, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1, ensure_ascii=False)
            file.write("\n")
    for note in notes:
        print(note)
    print(f"{len(classnames)} classname lists, {len(templates)} template lists written to {args.out}")


if __name__ == "__main__":
    main()
