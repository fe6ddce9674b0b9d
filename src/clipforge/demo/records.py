"""Read each demo source into records: an original image file, its real name, and caption variants.

Captions come only from text people wrote: the Tux Paint stamp descriptions, Open Clip Art titles
and keywords, and the Unicode CLDR emoji names and keywords (via emojibase) for every emoji style
(Noto, Twemoji, OpenMoji, Fluent 3D). Each record gets a few
variants ("a red apple", "an emoji of a red apple", "red apple: fruit", "a red apple, food & drink").

Nothing here renders or writes; ``demo_dataset`` does that.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .sources import package_dir

# Longest caption kept, in words: the CLIP tokenizer's 77-token context fits this with room to spare.
MAX_CAPTION_WORDS = 30
# Emoji groups (emojibase keys) left out: flags (the issue allows dropping them) and skin/hair components.
DROPPED_EMOJI_GROUPS = {"flags", "component"}
# Open Clip Art keywords that say nothing about the picture.
_NOISE_KEYWORDS = {"", "hash", "unsorted", "icon", "icons", "theme", "clip art", "clipart", "image", "media"}
# Open Clip Art entries whose keywords include one of these are series of near-identical drawings.
_OPENCLIPART_SERIES = {"flag", "pattern", "signalflag"}
# Open Clip Art files by this author carry Italian titles; captions here are English.
_OPENCLIPART_NON_ENGLISH = "architetto"


@dataclass
class DemoRecord:
    source: str  # "tuxpaint", "openclipart", "noto", "twemoji", "openmoji" or "fluent3d"
    key: str  # unique within the source; the stem of the rendered file
    group: str  # records sharing a group (one emoji in two styles, stamps with one caption) split together
    path: Path  # the original image file (PNG, WebP, or SVG that the renderer rasterises)
    label: str  # the short real name: "red apple", "frog"
    category: str  # the source's category: "food & drink", "animals amphibians"
    captions: list[str] = field(default_factory=list)


# a leading determiner or clock time takes no article ("the letter A", "one o'clock", "twelve-thirty")
_DETERMINERS = {"a", "an", "the", "some", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"}


def with_article(noun: str) -> str:
    """'apple' -> 'an apple', 'red car' -> 'a red car'; plurals and names with a determiner stay as they are."""
    words = noun.split()
    if not words:
        raise ValueError("with_article got an empty name")
    first = words[0].lower()
    if first.removesuffix("-thirty") in _DETERMINERS or first[0].isdigit():
        return noun
    head = re.split(r" with | of | on | in |: |, ", noun)[0].split()[-1].lower()
    if head in {"people", "men", "women", "children", "feet", "teeth", "mice", "geese", "sheep", "fish"} or (
            head.endswith("s") and not head.endswith(("ss", "us", "is"))):
        return noun
    # the sound, not the letter, decides: "a one-piece swimsuit", "a euro", "an hourglass"
    vowel_sound = (first[0] in "aeio" and not first.startswith(("one", "eu", "ewe"))) or first.startswith(
        ("hour", "honest", "honou", "heir")) or (
        first[0] == "u" and not first.startswith(("uni", "use", "usu", "usb", "usa", "uk", "ur", "ut")))
    return f"{'an' if vowel_sound else 'a'} {noun}"


def first_sentence(text: str) -> str:
    """The first sentence of a description, without its final full stop."""
    sentence = re.split(r"(?<=[.!?])\s+", text.strip())[0]
    return sentence.rstrip(".").strip()


def clip_words(text: str, max_words: int = MAX_CAPTION_WORDS) -> str:
    """Cut a caption to at most ``max_words`` words so it fits the text encoder's context."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def _unique(captions: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for caption in captions:
        caption = clip_words(" ".join(caption.split()))
        if caption and caption.lower() not in seen:
            seen.add(caption.lower())
            kept.append(caption)
    return kept


# ----------------------------------------------------------------------------------------- emoji
def emoji_key(hexcode: str) -> str:
    """A file-name key shared by all emoji packages: lower case, without the FE0F variation selector."""
    return "-".join(part for part in hexcode.lower().replace("_", "-").split("-") if part != "fe0f")


def emoji_names(cache_dir: Path) -> dict[str, dict]:
    """CLDR names, keywords and groups from emojibase, keyed by ``emoji_key``; skin tones left out."""
    folder = package_dir("emojibase-data", cache_dir) / "en"
    entries = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    messages = json.loads((folder / "messages.json").read_text(encoding="utf-8"))
    groups = {g["order"]: (g["key"], g["message"]) for g in messages["groups"]}
    subgroups = {g["order"]: g["message"] for g in messages["subgroups"]}
    names = {}
    for entry in entries:  # skin-tone variants live under entry["skins"] and are not read
        if "group" not in entry:  # regional indicator letters
            continue
        group_key, group = groups[entry["group"]]
        if group_key in DROPPED_EMOJI_GROUPS:
            continue
        names[emoji_key(entry["hexcode"])] = {
            "label": entry["label"], "tags": entry.get("tags", []), "group": group,
            "subgroup": subgroups.get(entry.get("subgroup"), "")}
    return names


def emoji_captions(label: str, tags: list[str], group: str) -> list[str]:
    """Caption variants of one emoji from its CLDR name, keywords and group."""
    name_words = set(re.findall(r"[\w’']+", label.lower()))
    extra_tags = [t for t in tags if t.lower() not in name_words][:5]
    captions = [with_article(label), f"an emoji of {with_article(label)}", f"{with_article(label)}, {group}"]
    if extra_tags:
        captions.append(f"{label}{', ' if ':' in label else ': '}{', '.join(extra_tags)}")
    return _unique(captions)


def emoji_records(source: str, cache_dir: Path, names: dict[str, dict]) -> list[DemoRecord]:
    """One record per named emoji image of ``source`` ("noto", "twemoji", "openmoji" or "fluent3d")."""
    if source == "fluent3d":
        folder = package_dir("@lobehub/fluent-emoji-3d", cache_dir) / "assets"
        files = {emoji_key(p.stem): p for p in folder.glob("*.webp")}
    elif source == "openmoji":  # colour SVGs named by code points ("1F34E.svg"); its own extras have no CLDR name
        folder = package_dir("openmoji", cache_dir) / "color" / "svg"
        files = {emoji_key(p.stem): p for p in folder.glob("*.svg")}
    else:
        package = {"noto": "emoji-datasource-google", "twemoji": "emoji-datasource-twitter"}[source]
        style = {"noto": "google", "twemoji": "twitter"}[source]
        folder = package_dir(package, cache_dir) / "img" / style / "64"
        files = {emoji_key(p.stem): p for p in folder.glob("*.png")}
    if not files:
        raise FileNotFoundError(f"no emoji images in {folder}; reinstall the package that provides it")
    records = []
    for key in sorted(files.keys() & names.keys()):  # keys not in names: skin tones, flags, components
        entry = names[key]
        records.append(DemoRecord(source, key, f"emoji:{key}", files[key], entry["label"], entry["group"],
                                  emoji_captions(entry["label"], entry["tags"], entry["group"])))
    return records


# -------------------------------------------------------------------------------------- tux paint
def tuxpaint_records(stamps_dir: Path) -> list[DemoRecord]:
    """Stamps that have a PNG (else an SVG, rasterised later) and an English description; stamps with
    the same description share a group."""
    records = []
    for text_file in sorted(stamps_dir.rglob("*.txt")):
        image = next((path for path in (text_file.with_suffix(".png"), text_file.with_suffix(".svg"))
                      if path.is_file()), None)
        if image is None:
            continue
        lines = text_file.read_text(encoding="utf-8", errors="replace").splitlines()
        description = next((ln.strip() for ln in lines if ln.strip() and ".utf8=" not in ln), "")
        if not description:
            continue
        relative = text_file.relative_to(stamps_dir).with_suffix("")
        category = " ".join(relative.parent.parts).replace("_", " ")
        sentence = first_sentence(description)
        short = sentence[0].lower() + sentence[1:]
        label = re.sub(r"^(a|an|the) ", "", short, flags=re.IGNORECASE)
        captions = [description, short, f"{short}, {category}"]
        if re.match(r"(a|an) ", short):  # a noun phrase ("A frog."), not a sentence ("Tankers carry ...")
            captions.insert(2, f"a picture of {short}")
        records.append(DemoRecord("tuxpaint", "-".join(relative.parts), f"tuxpaint:{short.lower()}",
                                  image, label, category, _unique(captions)))
    return records


# ----------------------------------------------------------------------------------- open clip art
_TITLE = re.compile(r"<cc:Work[^>]*>.*?<dc:title>([^<]*)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_KEYWORD = re.compile(r"<rdf:li>([^<]*)</rdf:li>")
_LICENCE = re.compile(r"<cc:license\s+rdf:resource=\"([^\"]*)\"")


def _svg_head(path: Path) -> str:
    """The start of an SVG file, far enough to hold its metadata block (near the top in this set)."""
    with open(path, "rb") as file:
        head = file.read(8192)
        if b"</cc:Work>" not in head:
            head += file.read(200_000)
    return head.decode("utf-8", errors="replace")


def clean_title(title: str) -> str:
    """'Hot_Dog' -> 'hot dog', 'glace_2' -> 'glace', 'microchip v.2' -> 'microchip'."""
    title = re.sub(r"[_\-]+", " ", title)
    title = re.sub(r"\s+(v\.?\s*)?\d+(\.\d+)*$", "", title.strip(), flags=re.IGNORECASE)
    title = re.sub(r"(?<=[a-z])\d+$", "", title)
    return " ".join(title.split()).lower()


def openclipart_records(png_dir: Path, svg_dir: Path) -> list[DemoRecord]:
    """Public-domain drawings with a descriptive title; generic and series titles are dropped."""
    candidates = _openclipart_metadata(Path(png_dir), Path(svg_dir))
    # A title shared by more than two files names a collection ("gramastar", "Part of the Flat Icon
    # Collection ..."), not the picture.
    title_counts = Counter(raw.lower() for _, raw, _, _ in candidates)
    records = []
    for png, raw, category, keywords in candidates:
        title = clean_title(raw)
        if (title_counts[raw.lower()] > 2 or len(re.findall(r"[a-z]", title)) < 3 or "@" in title or "#" in title
                or _OPENCLIPART_NON_ENGLISH in png.stem
                or "clipart" in title.replace(" ", "") or _OPENCLIPART_SERIES & set(keywords)):
            continue
        other_keywords = [k for k in keywords if k not in title][:5]
        captions = [with_article(title), f"a clip art of {with_article(title)}", f"{with_article(title)}, {category}"]
        if other_keywords:
            captions.append(f"{title}: {', '.join(other_keywords)}")
        key = "-".join(png.relative_to(png_dir).with_suffix("").parts)
        records.append(DemoRecord("openclipart", key, f"openclipart:{title}", png, title, category,
                                  _unique(captions)))
    return records


@functools.lru_cache(maxsize=2)
def _openclipart_metadata(png_dir: Path, svg_dir: Path) -> tuple[tuple[Path, str, str, tuple[str, ...]], ...]:
    """(png, raw title, category, keywords) of every public-domain drawing; cached, as reading ~7,000
    SVG headers is the slowest part of reading the sources."""
    svgs = {p.stem: p for p in sorted(svg_dir.rglob("*.svg"))}
    candidates = []
    for png in sorted(png_dir.rglob("*.png")):
        svg = svgs.get(png.stem)
        if svg is None:
            continue
        head = _svg_head(svg)
        licence, title, subject = _LICENCE.search(head), _TITLE.search(head), _SUBJECT.search(head)
        if not licence or "publicdomain" not in licence.group(1).lower() or not title:
            continue
        category = png.relative_to(png_dir).parts[0].replace("_", " ")
        keywords = [" ".join(k.replace("_", " ").split()).lower() for k in _KEYWORD.findall(subject.group(1))] \
            if subject else []
        keywords = [k for k in dict.fromkeys(keywords)
                    if k not in _NOISE_KEYWORDS and k != category and not k.startswith("hash(")]
        candidates.append((png, title.group(1).strip(), category, tuple(keywords)))
    return tuple(candidates)
