"""Which prompts help the demo's models: template sets scored on a validation split and on the eval set.

The validation split is 300 Fluent 3D classes that are not among the demo's 200 eval classes
(``clipforge.demo.dataset.validation_records``: same style, same rule for which names qualify,
their Noto/Twemoji/OpenMoji styles in training), rendered like the eval images. A template set
chosen on it says something about the eval set without having looked at it. For each trained
demo model given (a ``runs/demo/model`` folder) and each template set, it prints top-1 on both
splits and the paired difference to the bare class names with its standard error
(``clipforge.evaluate.paired_difference``).

    PYTHONPATH=$PWD/src python benchmarks/demo_prompt_study.py runs/demo/model other-run/model
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from clipforge.checkpoints import load
from clipforge.demo.dataset import DemoDataConfig, default_data_dir, read_records, render_square, validation_records
from clipforge.demo.records import with_article
from clipforge.demo.run import ENSEMBLE_TEMPLATES
from clipforge.demo.sources import default_cache_dir
from clipforge.evaluate import evaluate_zeroshot, load_image_folder, paired_difference

# "{}" takes the name with its article ("an octopus"), as the demo's ensemble does; None: the bare name.
TEMPLATE_SETS = {
    "bare name": None,
    "name with article": ["{}"],
    "an emoji of {}": ["an emoji of {}"],
    "the demo's 8": list(ENSEMBLE_TEMPLATES),
    "training caption forms (3)": ["{}", "an emoji of {}", "a picture of {}"],
    "emoji forms (2)": ["{}", "an emoji of {}"],
    "with the emoji's group (3)": ["{}", "an emoji of {}", "{}, GROUP"],
}


def _render_validation(folder: Path, records: dict) -> dict[str, str]:
    """Write the validation images as a class-folder tree; returns each class's emoji group."""
    records = validation_records(records, DemoDataConfig())
    for record in records:
        (folder / record.label).mkdir(parents=True, exist_ok=True)
        render_square(record.path, DemoDataConfig().image_size).save(folder / record.label / f"{record.key}.png")
    return {r.label: r.category for r in records}


def _hits(model, preprocess, data, templates, groups) -> torch.Tensor:
    """(images,) top-1 right or wrong under ``templates`` (None: bare names)."""
    classnames = None
    if templates is not None and any("GROUP" in t for t in templates):  # per class: prompts as synonyms
        classnames = {name: [t.format(with_article(name)).replace("GROUP", groups[name]) for t in templates]
                      for name in data.classes}
        templates = None
    elif templates is not None:
        classnames = {name: with_article(name) for name in data.classes}
    result = evaluate_zeroshot(model, data, classnames=classnames, templates=templates, preprocess=preprocess,
                               batch_size=256, progress=False)
    hits = torch.zeros(len(data.paths), dtype=torch.bool)
    hits[result.indices] = result.logits.argmax(-1) == result.targets
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="trained demo model folders (runs/demo/model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = default_cache_dir()
    eval_dir = default_data_dir(cache_dir, DemoDataConfig()) / "eval" / "fluent3d"
    with tempfile.TemporaryDirectory() as tmp:
        records = read_records(cache_dir, DemoDataConfig())
        groups = _render_validation(Path(tmp), records)
        eval_groups = {r.label: r.category for r in records["fluent3d"]}
        splits = {"validation": (load_image_folder(tmp), groups), "eval": (load_image_folder(eval_dir), eval_groups)}
        rows = {name: {split: [] for split in splits} for name in TEMPLATE_SETS}
        for folder in args.models:
            model, preprocess = load(folder)
            for split, (data, split_groups) in splits.items():
                bare = _hits(model, preprocess, data, None, split_groups)
                for name, templates in TEMPLATE_SETS.items():
                    hits = bare if templates is None else _hits(model, preprocess, data, templates, split_groups)
                    rows[name][split].append((float(hits.float().mean()), *paired_difference(hits, bare)))
    print(f"{len(args.models)} model(s); validation {len(splits['validation'][0].classes)} classes, "
          f"eval {len(splits['eval'][0].classes)} classes; per model: top-1 (minus bare names +- paired s.e.)\n")
    print("| templates | validation | eval |\n|---|---|---|")
    for name, by_split in rows.items():
        cells = ["; ".join(f"{top1:.1%} ({diff * 100:+.1f} +- {error * 100:.1f})" for top1, diff, error in by_split[s])
                 for s in splits]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
