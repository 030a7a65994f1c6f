"""Names from the file system as text that is safe to store and to print.

A file name on Linux is bytes: one that is not valid UTF-8 reaches Python as a string with
surrogate escapes, which no UTF-8 file (scores.jsonl, scores.csv) can hold. A name may also
hold terminal control sequences (ESC ] 0; ... BEL retitles the window, ESC [ 2 J clears it)
that must never reach a terminal raw. Rich's markup escape only covers its own [tags].
"""

from __future__ import annotations

import os
import unicodedata

from rich.markup import escape

# characters that reorder or hide the text around them on a terminal (bidi overrides and
# isolates), and the Unicode line breaks that would split one printed line in two
_INVISIBLE_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def storable(name: str | os.PathLike) -> str:
    """``name`` as valid UTF-8 text: each byte that is not UTF-8 becomes ``\\xNN``.

    Lossless for every valid name (it is returned as is); an invalid one stays readable and
    tells the user which bytes to fix."""
    text = os.fspath(name)
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:  # a lone surrogate that no file-system name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every C0/C1 control character (ESC, BEL, CR, newline, DEL, ...), bidi
    override and Unicode line break written as ``\\xNN`` / ``\\uNNNN``, after ``storable``:
    one line of plain characters whatever a file name holds."""
    safe = storable(str(text))
    return "".join(
        _escaped(c) if unicodedata.category(c) in ("Cc", "Cs") or c in _INVISIBLE_CONTROLS else c for c in safe
    )


def markup_safe(text: object) -> str:
    """``printable(text)`` with rich markup escaped: for console.print with markup on."""
    return escape(printable(text))
