"""The one rule for label names (server, client, `fcl-data`, SDK), and the normalisation of read text.

A label is any printable Unicode string: NFC-normalised, 1-`LABEL_MAX_CHARS` characters (code points),
no leading or trailing whitespace, and none of these characters:

* Cc control characters (NUL, TAB, newline, ESC, ...): they forge log lines and break terminals;
* Cf format characters: bidirectional controls (U+202A-U+202E, U+2066-U+2069, U+200E/U+200F) reorder
  what a log or a page shows, and zero-width ones (U+200B, U+FEFF) make two labels look the same.
  The joiners U+200C/U+200D are allowed between two other characters: Persian and Indic words and
  emoji sequences need them, and they reorder nothing;
* Zl/Zp line and paragraph separators (U+2028/U+2029): several log viewers and JavaScript break lines
  there;
* Cs surrogates (no UTF-8 form), Co private-use characters and Cn unassigned code points (what they
  show depends on fonts and on the Unicode version; this Python knows Unicode
  `unicodedata.unidata_version`).

Spaces inside a label (U+0020, NBSP, ideographic space, ...) are fine. Data readers normalise what they
read (`normalize_text`: NFC, surrounding whitespace removed); the server refuses a label that is not
already NFC instead of rewriting it, so a client and the server never disagree on a label's spelling.
"""

from __future__ import annotations

import unicodedata

from common import wire_limits as wire

LABEL_MAX_CHARS = wire.LABEL_MAX_CHARS
JOINERS = frozenset("\u200c\u200d")  # ZERO WIDTH NON-JOINER / JOINER: allowed inside a label
REFUSED_CATEGORIES: dict[str, str] = {
    "Cc": "control character",
    "Cf": "format character",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "surrogate",
    "Co": "private-use character",
    "Cn": "unassigned code point",
}
RULE = (
    f"a label is 1-{LABEL_MAX_CHARS} printable Unicode characters in NFC, with no control, format or "
    "line-separator characters and no leading or trailing whitespace"
)


class LabelError(ValueError):
    """A label name breaks the rule; the message quotes it and says what is wrong."""


def char_name(ch: str) -> str:
    """'U+202E RIGHT-TO-LEFT OVERRIDE' (the code point alone where Unicode has no name for it)."""
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def label_problem(label: object) -> str | None:
    """What is wrong with `label` as a label name (one phrase, without the label), or None if it is valid."""
    if not isinstance(label, str):
        return f"is of type {type(label).__name__}, not a string"
    if not label:
        return "is empty"
    bad = _bad_char(label)
    if bad is not None:
        return bad
    if label != label.strip():
        return "has leading or trailing whitespace"
    if not unicodedata.is_normalized("NFC", label):
        return (
            f"is not NFC-normalised (its NFC form is {wire.quoted(unicodedata.normalize('NFC', label))}); "
            "normalise labels to NFC before sending them (fcl-data and the SDK do)"
        )
    if len(label) > LABEL_MAX_CHARS:
        return f"is {len(label)} characters long, over the limit of {LABEL_MAX_CHARS}"
    return None


def _bad_char(label: str) -> str | None:
    for pos, ch in enumerate(label):
        category = unicodedata.category(ch)
        if category not in REFUSED_CATEGORIES:
            continue
        if ch in JOINERS and 0 < pos < len(label) - 1 and _joinable(label[pos - 1], label[pos + 1]):
            continue
        what = REFUSED_CATEGORIES[category]
        return f"has a {what} ({category}) {char_name(ch)} at position {pos + 1}"
    return None


def _joinable(before: str, after: str) -> bool:
    """A joiner stands between two characters that are neither format nor control characters."""
    return all(unicodedata.category(c) not in REFUSED_CATEGORIES for c in (before, after))


def check_label(label: object) -> str:
    """`label` if it is a valid label name; LabelError saying why not otherwise."""
    problem = label_problem(label)
    if problem is not None:
        shown = wire.quoted(label) if isinstance(label, str) else wire.quoted(repr(label))
        raise LabelError(f"label {shown} {problem}")
    assert isinstance(label, str)
    return label


def normalize_text(value: str) -> str:
    """What a data reader keeps of a text or label it read: NFC, surrounding whitespace removed."""
    return unicodedata.normalize("NFC", value).strip()


def text_problem(text: object) -> str | None:
    """What makes `text` unusable as an example's text (it is never shown, only encoded), or None.

    Any string will do except one with a surrogate: it has no UTF-8 form, so it could be neither
    written to a task stream nor tokenised. Empty texts are the reader's to drop (with a warning).
    """
    if not isinstance(text, str):
        return f"is of type {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")  # fails on surrogates only, and much faster than a scan in Python
    except UnicodeEncodeError as exc:
        return (
            f"has a lone surrogate {char_name(text[exc.start])} at position {exc.start + 1} (no UTF-8 form)"
        )
    return None
