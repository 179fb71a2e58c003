"""Text that a run or a model wrote, made safe before ar prints, commits or stores it.

A training log's last line, a crash reason or a model's Description is untrusted: it may
carry terminal escape sequences (ESC [ ... that move the cursor, rewrite earlier lines,
set the window title or a hyperlink), a NUL (git refuses it in a commit message), lone
surrogates (not encodable as UTF-8), or a line long enough to bury the rest. These
functions keep the words and drop the rest; they never raise.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls but tab and newline, DEL, and the Unicode format characters that
# reorder or hide text (bidi overrides, zero-width joiners are kept out of terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def unicode_safe(text: str) -> str:
    """`text` with lone surrogates (and other unencodable code points) replaced."""
    return text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")


def printable(text: object, keep_newlines: bool = True) -> str:
    """`text` without escape sequences, control or direction-changing characters."""
    value = unicode_safe(str(text if text is not None else ""))
    value = _ANSI.sub("", value)
    value = _BIDI.sub("", value)
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    value = _CONTROL.sub("", value if keep_newlines else value.replace("\n", " "))
    return unicodedata.normalize("NFC", value)


def one_line(text: object, limit: int = 300) -> str:
    """A single printable line of at most `limit` characters (whitespace collapsed)."""
    value = " ".join(printable(text, keep_newlines=False).split())
    return value if len(value) <= limit else value[: limit - 3] + "..."
