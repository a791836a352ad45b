"""Terminal escape filtering: of ANSI escape sequences only SGR (colours, bold) survive.

Used for `gitpipe logs` in a terminal and for the report pages, so a log line cannot
change a terminal's title, move its cursor or plant hyperlinks.
"""

from __future__ import annotations

import re

# CSI ... final byte; OSC ... BEL/ST; other two-byte escapes; lone control characters.
_CSI = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
_OTHER_ESC = re.compile(r"\x1b[P^_X][^\x1b]*(?:\x1b\\)?|\x1b[ -/]*[0-Z\\-~]|\x1b(?!\[)")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def _keep_sgr(m: re.Match[str]) -> str:
    params, inter, final = m.groups()
    if final == "m" and not inter and re.fullmatch(r"[0-9;]*", params):
        return m.group(0)
    return ""


def sanitize(text: str) -> str:
    """Keep SGR sequences, drop every other escape sequence and control character."""
    text = _OSC.sub("", text)
    text = _CSI.sub(_keep_sgr, text)
    text = _OTHER_ESC.sub("", text)
    return _CONTROL.sub("", text)


def strip(text: str) -> str:
    """Plain text: every escape sequence removed (for output that is not a terminal)."""
    return _CSI.sub("", sanitize(text))
