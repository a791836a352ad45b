"""Terminal escape filtering: of ANSI escape sequences only SGR colours and bold survive.

Used for `gitpipe logs` in a terminal and for the report pages, so a log line cannot
change a terminal's title, move its cursor, hide text or plant hyperlinks. `to_html`
turns the surviving SGR into `<span class="...">` with the text HTML-escaped; the
classes (`ab` bold, `f0`..`f255` foreground, `g0`..`g255` background, ...) are styled by
the report's site.css, so pages need no inline style (the CSP forbids it).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from markupsafe import Markup, escape

# What a terminal or a page never shows as text, as one pass of one pattern: string controls
# (OSC, DCS, SOS, PM, APC) up to their terminator, or to the end of the line when unterminated;
# CSI sequences; every other escape; C0 controls but tab and newline (NUL and CR too); DEL, C1
# controls and bidi overrides. One pass, so dropping one never joins its neighbours into another.
_STR_TOKENS = (r"\x1b[\]P^_X][^\n]*?(?:\x07|\x1b\\|(?m:$))"
               r"|\x1b\[([0-?]*)([ -/]*)([@-~])"
               r"|\x1b(?:[ -/]*[0-~])?"
               r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_TOKEN = re.compile(_STR_TOKENS)
# The same in UTF-8 bytes, for the masker (gitpipe.masking): a secret may hide behind exactly what
# this drops, so it matches a secret's characters with these between them.
TOKEN_BYTES = (rb"\x1b[\]P^_X][^\n]*?(?:\x07|\x1b\\|(?m:$))"
               rb"|\x1b\[[0-?]*[ -/]*[@-~]"
               rb"|\x1b(?:[ -/]*[0-~])?"
               rb"|[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]")
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_NEEDS_WORK = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # ESC and every control

BASIC = {0, 1, 2, 3, 4, 22, 23, 24, 39, 49, *range(30, 38), *range(40, 48), *range(90, 98),
         *range(100, 108)}


@functools.lru_cache(maxsize=1024)
def _allowed_sgr(params: str) -> str | None:
    """The colour/bold part of an SGR parameter list; None when nothing of it is kept."""
    if params == "":
        return ""
    codes = [int(p) if p else 0 for p in params.split(";")]
    kept: list[int] = []
    i = 0
    while i < len(codes):
        code = codes[i]
        if code in (38, 48):
            n = _extended_length(codes, i)
            if n and all(0 <= c <= 255 for c in codes[i + 2:i + n]):
                kept += codes[i:i + n]
            i += n or len(codes)
            continue
        if code in BASIC:
            kept.append(code)
        i += 1
    return ";".join(map(str, kept)) if kept else None


def _extended_length(codes: list[int], i: int) -> int:
    """How many codes a 38/48 colour takes (3 for 5;n, 5 for 2;r;g;b); 0 when malformed."""
    mode = codes[i + 1] if i + 1 < len(codes) else None
    n = {5: 3, 2: 5}.get(mode or -1, 0)
    return n if i + n <= len(codes) else 0


def sanitize(text: str) -> str:
    """Keep SGR colour/bold sequences, drop every other escape sequence and control character."""
    if not _NEEDS_WORK.search(text):
        return text  # the common case: plain text

    def keep(m: re.Match[str]) -> str:
        params, inter, final = m.groups()
        if final != "m" or inter or not re.fullmatch(r"[0-9;]*", params):
            return ""  # not a CSI (params is None), or a CSI other than SGR
        allowed = _allowed_sgr(params)
        return "" if allowed is None else f"\x1b[{allowed}m"

    return _TOKEN.sub(keep, text)


def strip(text: str) -> str:
    """Plain text: every escape sequence and control character removed (the text a reader sees)."""
    return _TOKEN.sub("", text) if _NEEDS_WORK.search(text) else text


def visible(text: str) -> str:
    """Text with its control characters shown as escapes (`\\x1b`), for messages that quote input."""
    return _NEEDS_WORK.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


# --------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class Style:
    """The SGR state that matters on a page."""

    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False
    fg: int | None = None
    bg: int | None = None

    def classes(self) -> str:
        """The CSS classes of this style, e.g. "ab f1"."""
        names = [n for n, on in (("ab", self.bold), ("ad", self.dim), ("ai", self.italic),
                                 ("au", self.underline)) if on]
        if self.fg is not None:
            names.append(f"f{self.fg}")
        if self.bg is not None:
            names.append(f"g{self.bg}")
        return " ".join(names)


_PLAIN = Style()
_FLAGS = {1: ("bold", True), 2: ("dim", True), 3: ("italic", True), 4: ("underline", True),
          23: ("italic", False), 24: ("underline", False)}


@functools.lru_cache(maxsize=4096)
def apply_sgr(style: Style, params: str) -> Style:
    """The style after one SGR parameter list (what sanitize would not keep is ignored)."""
    allowed = _allowed_sgr(params)
    if allowed is None:
        return style
    codes = [int(p) for p in allowed.split(";")] if allowed else [0]
    i = 0
    while i < len(codes):
        code = codes[i]
        if code in (38, 48):
            colour = _extended_colour(codes[i + 1:])
            style = replace(style, fg=colour) if code == 38 else replace(style, bg=colour)
            i += 3 if codes[i + 1] == 5 else 5
            continue
        style = _basic(style, code)
        i += 1
    return style


def _basic(style: Style, code: int) -> Style:
    if code == 0:
        return Style()
    if code in _FLAGS:
        name, value = _FLAGS[code]
        return replace(style, **{name: value})
    if code == 22:
        return replace(style, bold=False, dim=False)
    if 30 <= code <= 37 or 90 <= code <= 97:
        return replace(style, fg=code - 30 if code < 90 else code - 82)
    if 40 <= code <= 47 or 100 <= code <= 107:
        return replace(style, bg=code - 40 if code < 100 else code - 92)
    if code == 39:
        return replace(style, fg=None)
    if code == 49:
        return replace(style, bg=None)
    return style


def _extended_colour(rest: list[int]) -> int:
    """The 256-colour index of a `5;n` or `2;r;g;b` colour (true colour maps to the nearest)."""
    if rest[0] == 5:
        return rest[1]
    return nearest_256(rest[1], rest[2], rest[3])


def to_html(text: str) -> Markup:
    """Sanitized text as HTML: escaped, with SGR colours and bold as `<span class>`."""
    if not _NEEDS_WORK.search(text):
        return escape(text)  # the common case: no escape sequence, no control character
    out: list[str] = []
    style = _PLAIN
    for i, part in enumerate(_SGR.split(_only_sgr(text))):
        if i % 2:  # the split alternates text and SGR parameters
            style = apply_sgr(style, part)
        elif part:
            tag = _open_tag(style)
            out.append(f"{tag}{escape(part)}</span>" if tag else str(escape(part)))
    return Markup("".join(out))


def _only_sgr(text: str) -> str:
    """Text whose only escapes are SGR needs no sanitizing: apply_sgr ignores what is not kept."""
    return sanitize(text) if _NEEDS_WORK.search(_SGR.sub("", text)) else text


@functools.lru_cache(maxsize=1024)
def _open_tag(style: Style) -> str:
    classes = style.classes()
    return f'<span class="{classes}">' if classes else ""


# --------------------------------------------------------------------------- palette

# The 16 basic colours are themed by the stylesheet; 16..255 are xterm's fixed palette.
_CUBE = (0, 95, 135, 175, 215, 255)


@functools.cache
def palette_256() -> tuple[str, ...]:
    """Hex colours of xterm's indexes 16..255 (index i at position i - 16)."""
    colours = [f"#{_CUBE[r]:02x}{_CUBE[g]:02x}{_CUBE[b]:02x}"
               for r in range(6) for g in range(6) for b in range(6)]
    colours += [f"#{v:02x}{v:02x}{v:02x}" for v in range(8, 248, 10)]
    return tuple(colours)


@functools.lru_cache(maxsize=4096)
def nearest_256(r: int, g: int, b: int) -> int:
    """The xterm palette index (16..255) closest to a true colour."""
    best, best_d = 16, None
    for i, hex_colour in enumerate(palette_256(), 16):
        pr, pg, pb = (int(hex_colour[k:k + 2], 16) for k in (1, 3, 5))
        d = (pr - r) ** 2 + (pg - g) ** 2 + (pb - b) ** 2
        if best_d is None or d < best_d:
            best, best_d = i, d
    return best
