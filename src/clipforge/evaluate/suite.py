"""A benchmark suite: zero-shot over many datasets, few-shot linear probes, retrieval, one table.

    from clipforge.evaluate.suite import read_suite_config, run_suite
    config = read_suite_config("suite.toml")
    summary = run_suite(model, preprocess, config, "runs/suite", model_name="ViT-B-32", pretrained="ckpt.pt")

A suite file (TOML; relative paths are under the file's folder)::

    shots = [1, 2, 4, 8, 16]          # few-shot linear probes for datasets with probe_train

    [zeroshot.imagenet]               # a protocol name: read and scored by that protocol
    data = "/data/imagenet/val"
    probe_train = "/data/imagenet/train"
    [zeroshot.imagenet-r]
    data = "/data/imagenet-r"
    scoring = "subset"                # or "1000way"
    [zeroshot.fluent3d]               # any other name: an image folder, a path,label CSV, or
    data = "eval/fluent3d"            # CLIP_benchmark's webdataset folder (found by its files)
    classnames = "eval/fluent3d_classnames.txt"
    templates = "none"
    [retrieval.heldout]
    data = "heldout.jsonl"
    [references."ResNet-50 (my baseline)"]   # points in the robustness plot, top-1 %; without any
    imagenet = 76.1                          # such table, the paper's supervised ResNet-101
    imagenet-r = 36.2

Each result is written as it finishes, one JSON per dataset and task in CLIP_benchmark's schema
(``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, its file-name pattern
``{dataset}_{pretrained}_{model}_{language}_{task}.json``, a probe's task ``linear_probe_{k}shot`` in
the name only; its metrics ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``, ``fewshot_k``,
``seed``; ImageNet-O's ``aupr`` when ImageNet is in the suite), so ``skip_existing`` resumes a suite
that was stopped, and CLIP_benchmark's aggregation (``clip_benchmark build``) reads the folder. Each
JSON also records the ``settings`` it was computed with (data path, protocol, scoring, templates,
class names, probe split and seed, the checkpoint's fingerprint); a result is reused only when they
match the suite being run, else it is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
LANGUAGE = "en"
_ZEROSHOT_KEYS = {"data", "dataset", "scoring", "templates", "classnames", "images", "probe_train"}
_RETRIEVAL_KEYS = {"data", "images", "split"}


@dataclass
class ZeroShotEntry:
    """One classification set of the suite."""

    name: str  # the row name and CLIP_benchmark "dataset"
    data: str
    dataset: str | None = None  # protocol name, or None for a plain folder / CSV
    scoring: str = "subset"
    templates: str | list | None = None
    classnames: str | list | None = None
    images: str | None = None  # root of relative paths in a CSV listing
    probe_train: str | None = None  # training split for the few-shot probes


@dataclass
class RetrievalEntry:
    """One image-caption set of the suite."""

    name: str
    data: str
    images: str | None = None
    split: str = "test"


@dataclass
class SuiteConfig:
    """What a suite runs; ``shots`` empty: no probes."""

    zeroshot: list[ZeroShotEntry] = field(default_factory=list)
    retrieval: list[RetrievalEntry] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)
    references: dict[str, dict[str, float]] | None = None  # robustness-plot models; None: the paper's ResNet-101


def _protocol_of(name: str, data: str, dataset: str | None) -> str | None:
    from .protocols import canonical_name, looks_like_wds

    if dataset:
        return canonical_name(dataset)
    try:
        return canonical_name(name)
    except ValueError:
        return "wds" if looks_like_wds(data) else None


def _check_types(section: str, values: dict) -> None:
    """Paths and names are non-empty strings; templates and class names a string or a list of them."""
    for key, value in values.items():
        listed = key in ("templates", "classnames") and isinstance(value, list)
        if listed and all(isinstance(item, str) for item in value):
            continue
        if not isinstance(value, str) or (not value.strip() and key != "templates"):
            expected = "a string or a list of strings" if key in ("templates", "classnames") else "a non-empty string"
            raise ValueError(f"{section}: {key} must be {expected}, got {value!r}")


def zeroshot_entry(name: str, data: str, **options) -> ZeroShotEntry:
    """A :class:`ZeroShotEntry`, its protocol taken from ``dataset`` or the name (or a wds folder)."""
    unknown = set(options) - (_ZEROSHOT_KEYS - {"data"})
    if unknown:
        raise ValueError(f"zeroshot.{name}: unknown key(s) {sorted(unknown)}; expected {sorted(_ZEROSHOT_KEYS)}")
    _check_types(f"zeroshot.{name}", {"data": data, **{k: v for k, v in options.items() if v is not None}})
    dataset = _protocol_of(name, data, options.pop("dataset", None))
    scoring = options.pop("scoring", "subset")
    if scoring not in ("subset", "1000way"):
        raise ValueError(f"zeroshot.{name}: scoring must be subset or 1000way, got {scoring!r}")
    if dataset and options.get("classnames"):
        raise ValueError(f"zeroshot.{name}: classnames do not apply to the {dataset} protocol")
    return ZeroShotEntry(name=name, data=data, dataset=dataset, scoring=scoring, **options)


def _resolve(base: Path, key: str, value):
    """Paths relative to the suite file; class-name and template specs only when such a file exists."""
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    if key in ("data", "images", "probe_train"):
        return value if key == "probe_train" and value == "train" else str(base / value)
    return str(base / value) if (base / value).is_file() else value


def read_suite_config(path: str | os.PathLike) -> SuiteConfig:
    """A :class:`SuiteConfig` from a TOML suite file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such suite file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not TOML ({error})") from None
    unknown = set(raw) - {"zeroshot", "retrieval", "shots", "references"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected zeroshot, retrieval, shots, references")
    base = path.parent
    config = SuiteConfig(shots=parse_shots(raw.get("shots", []), str(path)))
    if "references" in raw:
        config.references = parse_references(raw["references"], f"{path}: references")
    for name, table in raw.get("zeroshot", {}).items():
        if not isinstance(table, dict) or "data" not in table:
            raise ValueError(f"{path}: [zeroshot.{name}] needs data = PATH")
        options = {key: _resolve(base, key, value) for key, value in table.items()}
        try:
            config.zeroshot.append(zeroshot_entry(name, **options))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    for name, table in raw.get("retrieval", {}).items():
        if not isinstance(table, dict) or "data" not in table or set(table) - _RETRIEVAL_KEYS:
            raise ValueError(f"{path}: [retrieval.{name}] takes data = PATH and optional images, split")
        _check_types(f"{path}: retrieval.{name}", table)
        config.retrieval.append(RetrievalEntry(name, **{k: _resolve(base, k, v) for k, v in table.items()}))
    if not config.zeroshot and not config.retrieval:
        raise ValueError(f"{path}: no [zeroshot.NAME] or [retrieval.NAME] tables")
    return config


def parse_references(tables, source: str = "references") -> dict[str, dict[str, float]]:
    """Reference models for the robustness plot: ``{name: {protocol: top-1 %}}``, each with ``imagenet``
    and at least one shifted set; one line naming the entry that is not."""
    from ._suite_report import MAX_REFERENCES, SHIFT_COLORS

    known = ["imagenet", *SHIFT_COLORS]
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{source} must hold [references.\"NAME\"] tables of top-1 %, got {tables!r}")
    if len(tables) > MAX_REFERENCES:
        raise ValueError(f"{source}: at most {MAX_REFERENCES} reference models fit the plot, got {len(tables)}")
    for name, scores in tables.items():
        where = f"{source}.{name}"
        if not isinstance(scores, dict) or "imagenet" not in scores or len(scores) < 2:
            raise ValueError(f"{where} must give imagenet and at least one of {', '.join(known[1:])} (top-1 %)")
        unknown = sorted(set(scores) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown set(s) {unknown}; expected {', '.join(known)}")
        for key, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{where}.{key} must be a top-1 in % (0 to 100), got {value!r}")
    return {name: {key: float(value) for key, value in scores.items()} for name, scores in tables.items()}


def parse_shots(value, source: str = "shots") -> list[int]:
    """Shots per class from a list, one integer or ``"1,2,4"``; each must be a positive integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"{source}: shots must be a list of integers such as [1, 2, 4], got {value!r}")
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        shots = [_whole(item) for item in items if str(item).strip()]
    except ValueError:
        raise ValueError(f"{source}: shots must be integers, got {value!r}") from None
    if any(k < 1 for k in shots):
        raise ValueError(f"{source}: shots must be at least 1, got {shots}")
    return sorted(set(shots))


def _whole(item) -> int:
    """``item`` as an int: an int, or a string of digits; 1.5, True or "x" are refused."""
    if isinstance(item, bool) or isinstance(item, float) or not isinstance(item, (int, str)):
        raise ValueError(item)
    return int(item)


def parse_pairs(text: str, option: str) -> list[tuple[str, str]]:
    """``[(name, path)]`` from ``"a=/x,b=/y"``; a name ends at its first ``=``, so a path may hold
    ``=``, and a path may hold ``,`` when the path so joined exists (``a=/data/x,y`` for ``/data/x,y``)."""
    pairs: list[list[str]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if pairs and (not sep or not os.path.exists(value.strip())) and os.path.exists(f"{pairs[-1][1]},{item}"):
            pairs[-1][1] = f"{pairs[-1][1]},{item}"  # the comma was part of the previous path
            continue
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{option}: expected NAME=PATH[,NAME=PATH...], got {item!r} (a comma is read as part "
                             "of a path only when that path exists; or list the sets in a --config suite file)")
        if name.strip() in {known for known, _ in pairs}:
            raise ValueError(f"{option}: {name.strip()!r} is given twice")
        pairs.append([name.strip(), value.strip()])
    if not pairs:
        raise ValueError(f"{option}: no NAME=PATH given")
    return [(name, path) for name, path in pairs]


def result_filename(dataset: str, pretrained: str, model: str, task: str) -> str:
    """CLIP_benchmark's default output name ``{dataset}_{pretrained}_{model}_{language}_{task}.json``
    (as it names them, without the ``wds/`` of a webdataset set's name)."""
    dataset = dataset[len("wds/"):] if dataset.startswith("wds/") else dataset
    return f"{dataset}_{pretrained}_{model}_{LANGUAGE}_{task}.json".replace("/", "_")


@dataclass
class SuiteRun:
    """The model and settings every task of a suite shares."""

    model: object
    preprocess: Callable
    out_dir: Path
    model_name: str
    pretrained: str
    skip_existing: bool = False
    batch_size: int = 64
    common: dict = field(default_factory=dict)  # device, precision, num_workers, cache_dir, progress
    seed: int = 0
    model_id: str | None = None  # the checkpoint's fingerprint: results of other weights are not reused

    def path(self, dataset: str, task: str) -> Path:
        """Where the result of ``task`` on ``dataset`` is written."""
        return self.out_dir / result_filename(dataset, self.pretrained, self.model_name, task)

    def record(self, dataset: str, task: str, metrics: dict, settings: dict, **extra) -> dict:
        """A result in CLIP_benchmark's schema, with the ``settings`` it was computed with."""
        return {"dataset": dataset, "model": self.model_name, "pretrained": self.pretrained, "task": task,
                "metrics": metrics, "language": LANGUAGE, **extra, "settings": settings}

    def settings(self, entry, probe: bool = False) -> dict:
        """What a result of ``entry`` depends on besides the model's name: reuse needs all of it equal."""
        fields = vars(entry).copy()
        for key in ("data", "images") + (("probe_train",) if probe else ()):
            value = fields.get(key)
            fields[key] = os.path.abspath(value) if isinstance(value, str) and value != "train" else value
        for key in ("templates", "classnames"):  # a file's words count, not only its name
            value = fields.get(key)
            if isinstance(value, str) and os.path.isfile(value):
                fields[key] = {"file": os.path.abspath(value),
                               "sha256": hashlib.sha256(Path(value).read_bytes()).hexdigest()}
        if not probe:
            fields.pop("probe_train", None)
        return {**fields, "model_id": self.model_id, **({"seed": self.seed} if probe else {})}

    def existing(self, dataset: str, task: str, settings: dict, quiet: bool = False) -> dict | None:
        """The finished result of ``task`` when resuming and it was computed with ``settings``."""
        path = self.path(dataset, task)
        if not self.skip_existing or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None  # a damaged result is recomputed
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) or record.get("task") is None:
            quiet or self.say(f"{path.name}: not a result; recomputing it")
            return None
        if record.get("settings") != settings:
            quiet or self.say(f"{path.name}: computed with other settings (data, protocol, scoring, templates or "
                     "weights); recomputing it")
            return None
        return record

    def say(self, message: str) -> None:
        """A progress line on stderr (when progress is on)."""
        if self.common.get("progress", True):
            print(f"suite: {message}", file=sys.stderr, flush=True)


def run_suite(model, preprocess: Callable, config: SuiteConfig, out_dir: str | os.PathLike,
              model_name: str, pretrained: str, skip_existing: bool = False, batch_size: int = 64,
              seed: int = 0, model_id: str | None = None, **common) -> dict:
    """Run every task of ``config``; write the JSONs, ``results.md``, ``results.csv`` and the plots.

    ``common``: ``device``, ``precision``, ``num_workers``, ``cache_dir``, ``progress``;
    ``model_id``: a fingerprint of the weights, so that ``skip_existing`` never reuses results of
    other weights saved under the same name. Returns ``{"records": [...], "written": [paths],
    "errors": [...]}``; a dataset or probe that fails is reported in ``errors`` (and the table) and
    the others still run.
    """
    from . import _suite_report, _suite_tasks

    run = SuiteRun(model, preprocess, Path(out_dir), model_name, pretrained, skip_existing, batch_size,
                   dict(common), seed, model_id)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    records, errors, in_memory = [], [], {}
    recompute = _suite_tasks.aupr_pair_to_recompute(run, config.zeroshot)
    for entry in config.zeroshot:
        try:
            record, result = _suite_tasks.zeroshot(run, entry, reuse=entry.name not in recompute)
        except Exception as error:  # noqa: BLE001 - one set's failure must not cost the others
            errors.append(_error(run, entry.name, error))
            continue
        records.append(record)
        if result is not None:
            in_memory[entry.dataset or entry.name] = (entry, result)
        if entry.probe_train and config.shots:
            probes, probe_errors = _suite_tasks.few_shot_probes(run, entry, config.shots)
            records += probes
            errors += [_error(run, entry.name, error, task) for task, error in probe_errors]
    records = _suite_tasks.add_imagenet_o_aupr(run, records, in_memory)
    for entry in config.retrieval:
        try:
            records.append(_suite_tasks.retrieval(run, entry))
        except Exception as error:  # noqa: BLE001
            errors.append(_error(run, entry.name, error))
    written = _suite_report.write_reports(records, errors, run.out_dir, config.references)
    return {"records": records, "written": written, "errors": errors}


def _error(run: SuiteRun, dataset: str, error: Exception, task: str | None = None) -> dict:
    """An ``errors`` entry: the message of a user error, the exception's type too for anything else."""
    expected = isinstance(error, (ValueError, OSError))
    message = str(error) if expected else f"{type(error).__name__}: {error}"
    run.say(f"{dataset}{' ' + task if task else ''} failed: {message}")
    return {"dataset": dataset, "error": message, **({"task": task} if task else {})}
