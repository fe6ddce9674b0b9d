"""What zero-shot classification says to the text tower: prompt templates and class names.

Templates come from a built-in dataset (the paper's curated lists in :mod:`.metadata`), a file, one
template or a list; each holds a ``{}`` (OpenAI) or ``{c}`` (CLIP_benchmark) placeholder. Class
names come from the data's own classes, a file, a mapping or a built-in dataset, aligned with
the data's label order by name or integer index. A class may be a list of synonyms.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from . import metadata

_PLACEHOLDER = re.compile(r"\{c?\}")


def fill_template(template: str, classname: str) -> str:
    """``template`` with its ``{}`` (OpenAI style) or ``{c}`` placeholder replaced by ``classname``."""
    return _PLACEHOLDER.sub(lambda _: classname, template)


def _read_list_file(path: Path) -> list | dict:
    """A JSON list or object, or the non-blank, non-``#`` lines of a text file; errors name ``path``."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is no text
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(data, (list, dict)):  # a bare string would be read as one name per character
            raise ValueError(f"{path}: expected a JSON list or object, got {type(data).__name__} {json.dumps(data)[:60]}")
        return data
    lines = text.splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """Templates from None/"none" (class name only), a dataset name, a file, one template or a list.

    A file is a JSON list or one template per line (``#`` comments allowed). Every template must
    hold a ``{}`` or ``{c}`` placeholder.
    """
    if templates is None or (isinstance(templates, str) and templates.strip().lower() == "none"):
        return ["{}"]
    if isinstance(templates, str):
        if os.path.isdir(templates):
            raise ValueError(f"templates {templates!r} is a folder; expected a templates file (a JSON list or one "
                             "per line), a dataset name, 'none', or a template with {}")
        if os.path.isfile(templates):
            resolved = _read_list_file(Path(templates))
            source = templates
        elif metadata.has_templates(templates):
            return metadata.templates(templates)
        elif _PLACEHOLDER.search(templates):
            return [templates]
        else:
            raise ValueError(f"templates {templates!r} is not a file, a known dataset "
                             f"({', '.join(metadata.dataset_names())}), 'none', or a template with {{}}")
    else:
        resolved, source = list(templates), "templates"
    if not resolved or not isinstance(resolved, list):
        raise ValueError(f"{source}: expected a non-empty list of templates")
    for template in resolved:
        if not isinstance(template, str) or not _PLACEHOLDER.search(template):
            raise ValueError(f"{source}: template {template!r} has no {{}} or {{c}} placeholder for the class name")
    return resolved


def class_synonyms(entry) -> list[str]:
    """A class entry as its list of names: a string is one name, a list its synonyms."""
    names = [entry] if isinstance(entry, str) else list(entry) if isinstance(entry, (list, tuple)) else None
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise ValueError(f"class name {entry!r} must be a non-empty string or list of strings")
    return names


def check_classnames(classnames: Sequence) -> None:
    """Raise ``ValueError`` for an empty list or a class name given twice (case-insensitive)."""
    if len(classnames) == 0:
        raise ValueError("no class names given")
    seen: dict[str, str] = {}  # lower-cased name -> the name as first given
    for entry in classnames:
        name = class_synonyms(entry)[0]
        key = " ".join(class_synonyms(entry)).strip().lower()
        if key in seen:
            if seen[key] == name:
                raise ValueError(f"label {name!r} is given twice")
            raise ValueError(f"labels {seen[key]!r} and {name!r} differ only in case, so their prompts are the "
                             "same: rename or merge one of them")
        seen[key] = name


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def resolve_classnames(spec, classes: Sequence[str]) -> list:
    """Prompt names for a dataset's ``classes`` (folder names or CSV labels, in label order).

    ``spec``: None (the class names with ``_`` as spaces); a dict or JSON object file mapping each
    class to a name or synonyms; a list, text file (one per line) or JSON list, in label order;
    or a built-in dataset name (its names matched to the classes by name, or to integer folder
    names by index). A list that matches the classes by name is aligned that way; for integer
    classes (0..N-1, 1..N, ...) the list is read in numeric order (the i-th name is the i-th smallest
    number's), not in the text order that labels them ("1", "10", "2"). A bad entry of a file or
    built-in dataset raises ``ValueError`` naming it.
    """
    if spec is None:
        names = [" ".join(c.replace("_", " ").split()) for c in classes]
        check_classnames(names)
        return names
    source, named = str(spec), isinstance(spec, (str, os.PathLike))
    if named and os.path.isfile(spec):
        spec = _read_list_file(Path(spec))
    elif isinstance(spec, str):
        if not metadata.has_classnames(spec):
            folder = " is a folder, so" if os.path.isdir(spec) else ""
            raise ValueError(f"classnames {spec!r}{folder} is neither a file nor a known dataset "
                             f"({', '.join(metadata.dataset_names())})")
        spec = metadata.classnames(spec)
    try:
        names = _align(spec, classes, source)
        check_classnames(names)
    except ValueError as error:  # a file's or dataset's bad entry names the file or dataset
        message = str(error)
        if not named or message.startswith(f"{source}: "):
            raise
        raise ValueError(f"{source}: {message}") from None
    return names


def _align(spec, classes: Sequence[str], source: str) -> list:
    if isinstance(spec, dict):
        missing = [c for c in classes if c not in spec]
        if missing:
            raise ValueError(f"{source}: no name for class(es) {missing[:5]}")
        return [spec[c] for c in classes]
    spec = list(spec)
    if len(spec) != len(classes):
        raise ValueError(f"{source}: {len(spec)} class names for {len(classes)} classes in the data")
    by_name = {_norm(class_synonyms(entry)[0]): entry for entry in spec}
    if all(_norm(c) in by_name for c in classes):
        return [by_name[_norm(c)] for c in classes]
    numbers = [int(c) for c in classes if c.strip().isdigit()]
    if len(numbers) == len(classes) and len(set(numbers)) == len(numbers):
        # Integer classes (0..N-1, 1..N, ...) are listed in numeric order, while the data's labels
        # sort them as text ("1", "10", "2"): the list's i-th name is the i-th smallest number's.
        rank = {number: position for position, number in enumerate(sorted(numbers))}
        return [spec[rank[number]] for number in numbers]
    return spec
