"""Text cleaning before BPE, exactly as OpenAI's CLIP does it.

OpenAI's ``basic_clean`` + ``whitespace_clean``: ``ftfy.fix_text``, ``html.unescape`` twice,
whitespace runs collapsed to one space, ends stripped, lower-cased.

``ftfy.fix_text`` is exact but slow: about 40 us a caption, nearly all of it the Python overhead
of running a dozen fixers that change nothing. :func:`fix_text` gives the same result without
calling ftfy when every step of ftfy 6's default pipeline provably leaves the text unchanged:

- the fixers that rewrite characters (C1 controls, Latin ligatures, full/half width forms, curly
  quotes, line breaks, surrogates, terminal escapes, control characters, HTML entities) each
  change only text containing one of their characters, collected in ``_FTFY_CHARACTERS`` from
  ftfy's own tables;
- the mojibake fixer returns text unchanged when ``ftfy.badness.is_bad`` is false (the same call
  ftfy makes); each alternative of that regex must consume a character of one item, and
  ``_ftfy_anchors.py`` holds, per ftfy version, the ~220 characters of one such item chosen per
  alternative (C1 controls, symbols, upper-case accented and a few Greek and Cyrillic capitals:
  rare in real text), so ``is_bad`` runs only on text that has one of them;
- NFC normalisation changes nothing on text that ``unicodedata.is_normalized`` accepts.

Text whose only fixable characters are full/half-width forms and curly quotes (and text that is
not NFC) is fixed without ftfy too, by replaying its pipeline: when ``is_bad`` is false for the
text, ftfy's first pass only maps those characters, as ``fix_character_width`` and
``uncurl_quotes`` do, and NFC-normalises; if the result passes the identity test above, the
second pass changes nothing and ftfy returns it.

Anything else goes through ftfy itself. With another major version of ftfy, whose pipeline may
differ, ftfy is always called; with a badness regex not in ``_ftfy_anchors.py`` (ftfy 6.0.3 to
6.3.1 are, by hash of the regex), ``is_bad`` always runs. ``tests/test_text_clean.py`` checks
the shortcut against ``ftfy.fix_text`` over every code point and on thousands of real and
random texts.
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes

from ._ftfy_anchors import BADNESS_ANCHORS

# An '&' that starts an entity for html.unescape or ftfy needs a non-space character after it.
_ENTITY_START = re.compile(r"&[^ ]")


def _ftfy_characters() -> str:
    """Every character that a rewriting fixer of ftfy 6 acts on."""
    codes = {*ftfy.chardata.LIGATURES, *ftfy.chardata.WIDTH_MAP, *ftfy.chardata.CONTROL_CHARS}
    codes.update(range(0x80, 0xA0))  # fix_c1_controls
    codes.update([0x2BC, *range(0x2018, 0x2020)])  # uncurl_quotes
    codes.update([0x0A, 0x0D, 0x85, 0x2028, 0x2029])  # fix_line_breaks (and fix_text's lines)
    codes.update(range(0xD800, 0xE000))  # fix_surrogates
    codes.update([0x1B, ord("&")])  # remove_terminal_escapes, unescape_html
    return "".join(map(chr, sorted(codes)))


def badness_pattern_hash() -> str:
    """First 10 hex digits of the sha256 of the installed ftfy's badness regex."""
    pattern = ftfy.badness.BADNESS_RE.pattern
    return hashlib.sha256(pattern.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _width_and_quote_fixes() -> dict[int, str]:
    """The characters that only ``fix_character_width`` and ``uncurl_quotes`` act on, mapped to
    what those two fixers, in ftfy's order, make of them."""
    codes = set(ftfy.chardata.WIDTH_MAP) | {0x2BC, *range(0x2018, 0x2020)}
    codes -= {*ftfy.chardata.LIGATURES, *ftfy.chardata.CONTROL_CHARS, *range(0x80, 0xA0)}
    return {code: ftfy.fixes.uncurl_quotes(ftfy.fixes.fix_character_width(chr(code))) for code in codes}


_FIXED_BY_FTFY = _ftfy_characters()
_FTFY_CHARACTERS = re.compile("[" + re.escape(_FIXED_BY_FTFY) + "]")
_FTFY_SHORTCUT = ftfy.__version__.split(".")[0] == "6"
_BADNESS_ANCHORS = BADNESS_ANCHORS.get(badness_pattern_hash())
# A fixer's character or a badness anchor; None for an unlisted badness regex (always ask is_bad)
_FTFY_OR_ANCHOR = re.compile("[" + re.escape(_FIXED_BY_FTFY + _BADNESS_ANCHORS) + "]") \
    if _BADNESS_ANCHORS else None
_ANCHOR = re.compile("[" + re.escape(_BADNESS_ANCHORS) + "]") if _BADNESS_ANCHORS else None
_WIDTH_AND_QUOTES = _width_and_quote_fixes()
# Characters of the other fixers (line breaks, controls, ligatures, '&', ...)
_OTHER_FIXERS = re.compile("[" + re.escape("".join(
    char for char in _FIXED_BY_FTFY if ord(char) not in _WIDTH_AND_QUOTES)) + "]")


def ftfy_is_identity(text: str) -> bool:
    """True only when ``ftfy.fix_text(text) == text`` is certain without running ftfy.

    Texts longer than ftfy's 1,000,000-character segment are never shortcut.
    """
    if not (_FTFY_SHORTCUT and len(text) < 1_000_000 and unicodedata.is_normalized("NFC", text)):
        return False
    if _FTFY_OR_ANCHOR is not None and _FTFY_OR_ANCHOR.search(text) is None:
        return True  # no fixer has anything to act on, and the badness regex cannot match
    return _FTFY_CHARACTERS.search(text) is None and not ftfy.badness.is_bad(text)


def _fix_width_and_quotes(text: str) -> str | None:
    """``ftfy.fix_text(text)`` where the width and quote fixers and NFC are all that act on
    ``text``, else None (see the module docstring)."""
    if not (_FTFY_SHORTCUT and len(text) < 1_000_000) or _OTHER_FIXERS.search(text) is not None:
        return None
    if (_ANCHOR is None or _ANCHOR.search(text) is not None) and ftfy.badness.is_bad(text):
        return None  # the mojibake fixer would act
    fixed = unicodedata.normalize("NFC", text.translate(_WIDTH_AND_QUOTES))  # ftfy's first pass
    return fixed if ftfy_is_identity(fixed) else None


def _fix_changed_text(text: str) -> str:
    """``ftfy.fix_text(text)`` for text that ``ftfy_is_identity`` has turned down."""
    fixed = _fix_width_and_quotes(text)
    return ftfy.fix_text(text) if fixed is None else fixed


def fix_text(text: str) -> str:
    """``ftfy.fix_text(text)`` with its default settings, without running ftfy where the result
    is certain (see the module docstring)."""
    return text if ftfy_is_identity(text) else _fix_changed_text(text)


def needs_ftfy(text: str) -> bool:
    """False only for printable ASCII in which no ``&`` is followed by a non-space character.

    ftfy changes only non-ASCII characters, control characters and entities, and html.unescape
    only entities, so both return such text unchanged (the tests check this on many inputs).
    """
    return not (text.isascii() and text.isprintable()
                and ("&" not in text or _ENTITY_START.search(text) is None))


def clean_pieces(text: str) -> list[str]:
    """The cleaned text's space-separated pieces (see :func:`clean_text`)."""
    if needs_ftfy(text) and not ftfy_is_identity(text):  # else ftfy and html change nothing
        return fixed_pieces(text)
    # lower() neither makes nor changes whitespace, so lower-then-split is split-then-lower.
    return text.lower().split()


def fixed_pieces(text: str) -> list[str]:
    """:func:`clean_pieces` of text that ``ftfy_is_identity`` has turned down (ftfy may act)."""
    text = _fix_changed_text(text)
    if "&" in text:  # html.unescape changes nothing in text without '&'
        text = html.unescape(html.unescape(text))
    return text.lower().split()


def clean_text(text: str) -> str:
    """Clean ``text`` exactly as OpenAI does: ftfy, html.unescape twice, whitespace, lower case.

    ``str.split`` equals OpenAI's ``regex.sub(r"\\s+", " ", ...)`` here: the only characters on
    which the two disagree (U+001C..U+001F) are removed by ftfy and never made by html.unescape.
    """
    return " ".join(clean_pieces(text))
