"""clipforge.tokenizer.clean.fix_text equals ftfy.fix_text: its shortcut skips ftfy only where ftfy
provably changes nothing.

The shortcut rests on two facts about the installed ftfy, both checked here: the rewriting
fixers act only on the characters collected in ``_FTFY_CHARACTERS``, and every alternative of the
badness regex consumes one of the characters that ``_ftfy_anchors.py`` lists for it.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

import ftfy
import ftfy.badness
import pytest

from clipforge.tokenizer import clean as text_clean
from clipforge.tokenizer._ftfy_anchors import BADNESS_ANCHORS
from clipforge.tokenizer.clean import badness_pattern_hash, fix_text, ftfy_is_identity

CASES = Path(__file__).parent / "fixtures" / "tokenizer" / "cases.jsonl.gz"
ALL_CHARACTERS = [chr(code) for code in range(sys.maxunicode + 1)]


def test_shortcut_is_on_for_the_installed_ftfy():
    # ftfy 6.0.3 to 6.3.1 are listed; a newer badness regex turns only the is_bad skip off
    assert text_clean._FTFY_SHORTCUT
    assert badness_pattern_hash() in BADNESS_ANCHORS


def test_every_badness_alternative_consumes_an_anchor_character():
    """Parse ftfy's badness regex: each alternative must have a top-level single-character item
    that matches nothing outside the listed anchors, so text without one cannot match."""
    parser = pytest.importorskip("re._parser")
    compiler = pytest.importorskip("re._compiler")
    constants = pytest.importorskip("re._constants")
    pattern = ftfy.badness.BADNESS_RE
    anchors = set(BADNESS_ANCHORS[badness_pattern_hash()])
    outside = "".join(char for char in ALL_CHARACTERS if char not in anchors)
    (operation, (_, branches)), = parser.parse(pattern.pattern, pattern.flags).data
    assert operation is constants.BRANCH and len(branches) >= 30
    for branch in branches:
        held = [item for item in branch.data
                if item[0] in (constants.LITERAL, constants.IN)
                and compiler.compile(parser.SubPattern(branch.state, [item]),
                                     pattern.flags & ~re.VERBOSE).search(outside) is None]
        assert held, f"alternative {branch.data!r} can match without an anchor character"


def test_fixers_act_only_on_the_collected_characters():
    """Each rewriting fixer, on every code point outside _FTFY_CHARACTERS, changes nothing."""
    outside = "".join(char for char in ALL_CHARACTERS
                      if text_clean._FTFY_CHARACTERS.match(char) is None)
    for name in ("fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
                 "fix_line_breaks", "fix_surrogates", "remove_terminal_escapes",
                 "remove_control_chars", "unescape_html"):
        fixer = getattr(ftfy.fixes, name)
        for start in range(0, len(outside), 4096):  # fixers see lines of text, not all at once
            chunk = outside[start:start + 4096]
            assert fixer(chunk) == chunk, name


@pytest.mark.parametrize("context", ["{}", "a{}b", "É{}", "{}€", "Ã{}", "x {} 1"])
def test_fix_text_equals_ftfy_on_every_code_point(context):
    # the busy start of Unicode in full (Latin, Greek, Cyrillic, punctuation), then every 97th
    texts = [context.format(char) for char in ALL_CHARACTERS[:0x2100] + ALL_CHARACTERS[0x2100::97]]
    wrong = [text for text in texts if fix_text(text) != ftfy.fix_text(text)]
    assert not wrong, [ascii(text) for text in wrong[:5]]


def test_fix_text_equals_ftfy_on_real_and_random_texts():
    with gzip.open(CASES, "rt", encoding="ascii") as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = random.Random(0)
    pools = ["abc xyz", "éàüñçÉ", "€£¥©®°±µ·", "ÃÂâ€œ™", "Ð¿Ñ€Ð¸", "привет", "日本語", "😀👍",
             "\u0301\u0308", "ﬁﬂ", "’‘“”", "\r\n\t", "&amp;&lt;", "\x81\x9d", "ＡＢｃ１！＆", "ｶﾞﾊﾟｰ"]
    texts += ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 30)))
              for _ in range(3000)]
    shortcut = sum(map(ftfy_is_identity, texts))
    assert shortcut > 1000  # the shortcut is really taken, not just the fallback
    wrong = [text for text in texts if fix_text(text) != ftfy.fix_text(text)]
    assert not wrong, [ascii(text) for text in wrong[:5]]


def test_other_fixers_leave_width_and_quote_characters_alone():
    """The replay of ftfy's first pass maps these characters and nothing else acts on them."""
    chars = "".join(map(chr, sorted(text_clean._WIDTH_AND_QUOTES)))
    assert set("\u201c\u2019\u02bc\uff21\uff76\u3000") <= set(chars)
    for name in ("fix_c1_controls", "fix_latin_ligatures", "fix_line_breaks", "fix_surrogates",
                 "remove_terminal_escapes", "remove_control_chars", "unescape_html"):
        assert getattr(ftfy.fixes, name)(chars) == chars, name
    assert ftfy.fixes.uncurl_quotes(ftfy.fixes.fix_character_width(chars)) == chars.translate(
        text_clean._WIDTH_AND_QUOTES)


@pytest.mark.parametrize("context", ["{}", "a{}b", "“{}”", "É{}", "Ã{}", "{}\u0301", "ｶ{}", "{}amp;"])
def test_fix_text_equals_ftfy_on_every_width_and_quote_character(context):
    texts = [context.format(chr(code)) for code in text_clean._WIDTH_AND_QUOTES]
    wrong = [text for text in texts if fix_text(text) != ftfy.fix_text(text)]
    assert not wrong, [ascii(text) for text in wrong[:5]]


def test_width_and_quote_fixes_skip_ftfy_and_fall_back_when_unsure(monkeypatch):
    replayed = {"“Fine” isn’t it": '"Fine" isn\'t it', "ＬＯＵＤ　ｶﾞ": "LOUD ガ", "e\u0301": "\u00e9"}
    for text, expected in replayed.items():
        assert text_clean._fix_width_and_quotes(text) == expected == ftfy.fix_text(text)
    # mojibake found by is_bad before (”Ñ is Ӄ in Windows-1252) or after the replay, an entity
    # made by the width fixer, a line break, a ligature
    for unsure in ("”Ñ", "“Ã©”", "ＡＢ＆amp;", "“a”\n", "ﬁ“x”"):
        assert text_clean._fix_width_and_quotes(unsure) is None
        assert fix_text(unsure) == ftfy.fix_text(unsure)


def test_unknown_badness_regex_falls_back_to_is_bad(monkeypatch):
    monkeypatch.setattr(text_clean, "_FTFY_OR_ANCHOR", None)  # as for an unlisted ftfy
    monkeypatch.setattr(text_clean, "_ANCHOR", None)
    assert fix_text("“Ã©”") == ftfy.fix_text("“Ã©”") and fix_text("“ok”") == '"ok"'
    mojibake = "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows."
    assert not ftfy_is_identity(mojibake) and fix_text(mojibake) == ftfy.fix_text(mojibake)
    assert ftfy_is_identity("a plain caption")
