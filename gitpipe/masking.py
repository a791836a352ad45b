"""Masking secret values out of everything stored or shown, in whole strings and in byte streams.

`masked_forms` lists what is masked of a value: itself; hex (plain, or a space or colon between
bytes); URL encodings and the percent-encoding of every byte; base64 and base32, also as part
of a longer encoded text. A `Masker` replaces each by `***`:

- as written, also when a line break cuts a form after a run of at least 32 base64 characters
  (a wrapped encoding: `base64` wraps at 76 columns, PEM at 64);
- as shown: `gitpipe logs` and the pages drop escape sequences and control characters
  (gitpipe.ansi), so `sec\\e[mret` reads `secret`. A piece of a line (up to a CR or LF, as the
  log views split it) whose shown text holds a form is written as that text, masked.

Masking is a last line of defence, not a guarantee: a script holding a secret can always print
it some other way (reversed, a character per line, encrypted, a hex dump with offsets).
"""

from __future__ import annotations

import base64
import bisect
import functools
import os
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from gitpipe import ansi

MASK = "***"
WRAP_RUN = 32  # base64 characters before a line break that make it a wrap of an encoded text
PIECE_LIMIT = 64 * 1024  # bytes of one line piece held while escapes in it wait for more output

# A line break that wraps an encoded text; while more output may come, also a CR at the end.
_WRAP = re.compile(rb"(?<=[A-Za-z0-9+/=_-]{%d})\r?\n" % WRAP_RUN)
_WRAP_OPEN = re.compile(rb"(?<=[A-Za-z0-9+/=_-]{%d})(?:\r?\n|\r\Z)" % WRAP_RUN)
# A byte that starts something a log view does not show (or may, once more bytes come: a UTF-8
# lead of a C1 control or bidi override at the end).
_HIDDEN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2(?:[\x80-\x9f]|\Z)"
                     rb"|\xe2(?:\x80(?:[\xaa-\xae]|\Z)|\x81(?:[\xa6-\xa9]|\Z)|\Z)")
# The bytes _HIDDEN can start with; deleting every other byte is a fast test that none is there.
_NOT_SUSPECT = bytes(b for b in range(256)
                     if not (b in b"\x00\x7f\xc2\xe2" or (b < 0x20 and b not in b"\t\n\r")))
_TOKENS = re.compile(ansi.TOKEN_BYTES)
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_PIECES = re.compile(rb"(\r\n|\r|\n)")


# --- forms ------------------------------------------------------------------------------------


def masked_forms(value: str) -> list[str]:
    """The forms of `value` that are masked (see the module's docstring); longest first."""
    if not value:
        return []
    raw = value.encode()
    derived = _hex_forms(raw) | _url_forms(value) | _base64_forms(raw) | _base32_forms(raw)
    # A derived form shorter than the value would mask ordinary text (only tiny values have one).
    forms = {value} | {form for form in derived if len(form) >= len(value)}
    return sorted(forms, key=lambda form: (-len(form), form))


def _hex_forms(raw: bytes) -> set[str]:
    """Hex, lower- and upper-case: plain, or a space or colon between bytes."""
    forms = set()
    for pairs in ([f"{b:02x}" for b in raw], [f"{b:02X}" for b in raw]):
        forms |= {"".join(pairs), " ".join(pairs), ":".join(pairs)}
    return forms


def _url_forms(value: str) -> set[str]:
    """URL-encodings of `value` (quote and quote_plus, '/' kept or not) and the percent-encoding
    of every byte, with upper- or lower-case hex."""
    raw = value.encode()
    encoded = {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/"),
               "".join(f"%{b:02X}" for b in raw)}
    return encoded | {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), form) for form in encoded}


def _base64_forms(raw: bytes) -> set[str]:
    """base64 of `raw` (standard and urlsafe, padded or not), also as part of a longer stream."""
    forms: set[str] = set()
    for shift in range(3):
        # After `shift` other bytes, keep only the characters made of raw's bits alone: the
        # first and last ones also hold bits of the neighbouring bytes.
        first, end = (8 * shift + 5) // 6, 8 * (shift + len(raw)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(bytes(shift) + raw).decode()
            forms.add(encoded[first:end])
            if not shift:
                forms |= {encoded, encoded.rstrip("=")}
    forms.discard("")
    return forms


def _base32_forms(raw: bytes) -> set[str]:
    """base32 of `raw` (upper- or lower-case, padded or not), also as part of a longer stream."""
    forms: set[str] = set()
    for shift in range(5):
        first, end = (8 * shift + 4) // 5, 8 * (shift + len(raw)) // 5  # as in _base64_forms
        encoded = base64.b32encode(bytes(shift) + raw).decode()
        for case in (str.upper, str.lower):
            forms.add(case(encoded[first:end]))
            if not shift:
                forms |= {case(encoded), case(encoded.rstrip("="))}
    forms.discard("")
    return forms


def _trie_pattern(forms: list[str]) -> str:
    """A regex matching any of `forms`, the longest one at a given position.

    The alternation is factored by common prefixes: a flat `a|b|c` makes `re` try every form at
    every position, which is about 5x slower with 20 secrets. Siblings start with different
    characters and a form ending early is an optional group tried last, so the longest wins.
    """
    groups: dict[str, list[str]] = {}
    for form in sorted(form for form in forms if form):
        groups.setdefault(form[0], []).append(form)
    branches = []
    for group in groups.values():
        prefix = os.path.commonprefix(group)
        branches.append(re.escape(prefix) + _trie_pattern([form[len(prefix) :] for form in group]))
    if len(branches) < 2:
        body = "".join(branches)
    else:
        body = "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in forms and body else body


def _unwrapped(form: bytes) -> set[bytes]:
    """A form as matched: without its wrap breaks. Whether its first line break is one depends on
    what comes before it in a log, so a form with line breaks has both readings."""
    return {_WRAP.sub(b"", form), _WRAP.sub(b"", b"A" * WRAP_RUN + form)[WRAP_RUN:]}


class _Tables:
    """What a Masker matches with, built once per set of secret values (see `_tables`)."""

    def __init__(self, values: frozenset[str]) -> None:
        self.forms = sorted({f for value in values for f in masked_forms(value)}, key=lambda f: (-len(f), f))
        matched = sorted({u for f in self.forms for u in _unwrapped(f.encode())}, key=lambda f: (-len(f), f))
        pattern = _trie_pattern([f.decode() for f in matched])
        # UTF-8 keeps the pattern's meaning: groups and `?` only ever wrap whole characters.
        self.regex = re.compile(pattern.encode()) if matched else None
        self.longest = max(map(len, matched), default=0)
        self.heads: dict[int, list[bytes]] = {}  # first byte -> forms of two bytes or more
        for form in matched:
            if len(form) > 1:
                self.heads.setdefault(form[0], []).append(form)
        heads = b"".join(re.escape(bytes([byte])) for byte in self.heads)
        self.head = re.compile(b"[" + heads + b"]") if heads else None
        # The quick test of a chunk: no form can match where none of these is a substring of the
        # chunk without its line breaks, in lower case. A needle holding another adds nothing.
        needles = sorted({f.translate(_FOLD, b"\r\n") for f in matched}, key=len)
        self.needles: list[bytes] = []
        for needle in needles:
            if not any(kept in needle for kept in self.needles):
                self.needles.append(needle)


@functools.lru_cache(maxsize=32)
def _tables(values: frozenset[str]) -> _Tables:
    """The tables of a set of values: every action of a repo has the same ones."""
    return _Tables(values)


# --- masking ----------------------------------------------------------------------------------


class Masker:
    """Replaces every form (see `masked_forms`) of every secret value by `***`."""

    masked_forms = staticmethod(masked_forms)

    def __init__(self, values: Iterable[str]) -> None:
        self._t = _tables(frozenset(v for v in values if v))
        self.forms = self._t.forms
        self.longest = self._t.longest

    def mask(self, text: str) -> str:
        """`text` with every secret form replaced by `***`, as written and as shown."""
        if not self.forms:
            return text
        data = text.encode("utf-8", "surrogatepass")
        masked = self._split(data, final=True)[0].decode("utf-8", "surrogatepass")
        shown = ansi.strip(masked)
        if shown is not masked and (remasked := self.mask(shown)) != shown:
            return remasked  # a secret hidden by escapes: the text as shown, masked
        return masked

    def stream(self) -> MaskStream:
        """A new stream masker for one log."""
        return MaskStream(self)

    def _candidate(self, data: bytes) -> bool:
        """Whether a form may match in `data` (a substring test per needle: C fast search)."""
        data = data.translate(_FOLD, b"\r\n")
        return any(needle in data for needle in self._t.needles)

    def _split(self, buf: bytes, final: bool, context: bytes = b"") -> tuple[bytes, int]:
        """Mask `buf` up to the first position whose decision needs more bytes (none when `final`):
        the masked bytes and that position. `context` is what came before buf: its last bytes
        decide whether a line break at buf's start wraps an encoded text.

        Equals masking the whole stream at once: a position is decided only when no longer form
        could still match there, and positions skipped by a match are never considered.
        """
        t = self._t
        if not self._candidate(buf):
            cut = len(buf) if final else self._pending(buf, context)
            return buf[:cut], cut
        assert t.regex is not None
        view = _Unwrapped(context + buf, len(context), final)
        text = view.text
        cut = len(text) if final else self._prefix_start(text, 0)
        out: list[bytes] = []
        done = 0
        for match in t.regex.finditer(text):
            if match.start() >= cut:
                break
            out += (view.slice(done, match.start()), view.masked(match.start(), match.end()))
            done = match.end()
            if done > cut:
                cut = len(text) if final else self._prefix_start(text, done)
        out.append(view.slice(done, cut))
        return b"".join(out), view.bound(cut) - len(context)

    def _pending(self, buf: bytes, context: bytes) -> int:
        """First position in buf from which it may still begin a form; else len(buf)."""
        lo = max(0, len(buf) - 2 * self.longest)  # the longest proper prefix, and its wraps
        tail = buf[lo:]
        if b"\n" not in tail and b"\r" not in tail:
            return lo + self._prefix_start(tail, 0)
        full, off = (context + buf, len(context)) if lo < WRAP_RUN else (buf, 0)
        view = _Unwrapped(full, lo + off, final=False)
        return view.bound(self._prefix_start(view.text, 0)) - off

    def _prefix_start(self, text: bytes, start: int) -> int:
        """First position >= start from which `text` is a proper prefix of a form; else len(text)."""
        t = self._t
        if t.head is None:
            return len(text)
        for match in t.head.finditer(text, max(start, len(text) - self.longest + 1)):
            tail = text[match.start() :]
            if any(len(f) > len(tail) and f.startswith(tail) for f in t.heads[tail[0]]):
                return match.start()
        return len(text)


class _Unwrapped:
    """buf[start:] without its wrap breaks (`text`), and the way back to positions in buf.

    A break is written with the text before it; in a masked span the breaks are kept after the
    `***`, so a masked wrapped form keeps its lines.
    """

    def __init__(self, buf: bytes, start: int, final: bool) -> None:
        self.buf, self.start = buf, start
        wrap = _WRAP if final else _WRAP_OPEN
        self.breaks = [m.span() for m in wrap.finditer(buf, start)]
        self.at: list[int] = []  # text position of the character after each break
        self.gone: list[int] = []  # bytes removed up to and including each break
        parts, pos, gone = [], start, 0
        for a, b in self.breaks:
            parts.append(buf[pos:a])
            self.at.append(a - start - gone)
            gone += b - a
            self.gone.append(gone)
            pos = b
        parts.append(buf[pos:])
        self.text = b"".join(parts) if self.breaks else buf[start:]

    def raw(self, i: int) -> int:
        """Position in buf of text[i] (len(buf) for the end of the text)."""
        k = bisect.bisect_right(self.at, i)
        return self.start + i + (self.gone[k - 1] if k else 0)

    def bound(self, i: int) -> int:
        """Where buf is cut before text[i]: a break before it goes with what comes before."""
        return self.start if i == 0 else self.raw(i)

    def slice(self, i: int, j: int) -> bytes:
        return self.buf[self.bound(i) : self.bound(j)]

    def masked(self, i: int, j: int) -> bytes:
        """`***` for text[i:j], with the line breaks the span held."""
        a, b = self.bound(i), self.bound(j)
        first = self.raw(i)
        kept = [self.buf[s:e] for s, e in self.breaks if first <= s < b]
        return self.buf[a:first] + MASK.encode() + b"".join(kept)


class MaskStream:
    """Masks a byte stream written in pieces, as written and as shown (see the module docstring);
    holds back only what a later byte may still turn into a form: a tail that may begin one
    (less than twice the longest form), and a piece of a line with escapes in it (a bounded one)."""

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._held = b""
        self._context = b""  # the input bytes before _held: they decide whether a break wraps
        self._shown = _ShownPass(masker)

    @property
    def held(self) -> int:
        """Number of bytes held back."""
        return len(self._held) + self._shown.held

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of the stream; return what is safe to emit now, masked."""
        if not self._masker.forms:
            return data
        buf = self._held + data if self._held else data
        out, cut = self._masker._split(buf, False, self._context)
        self._held = buf[cut:]
        self._context = buf[cut - WRAP_RUN : cut] if cut >= WRAP_RUN else (self._context + buf[:cut])[-WRAP_RUN:]
        return self._shown.feed(out)

    def flush(self) -> bytes:
        """End of the stream: return the held-back tail, masked."""
        if not self._masker.forms:
            return b""
        out, _ = self._masker._split(self._held, True, self._context)
        self._held = self._context = b""
        return self._shown.feed(out) + self._shown.flush()


class _ShownPass:
    """The second pass of a stream: a secret that only shows once escapes are dropped.

    A piece of a line (the log views split lines at CR and LF) is checked as `ansi.strip` shows
    it; one that shows a form is written as its shown text, masked (its colours are lost). A
    piece with a hidden byte is held from up to `longest - 1` bytes before that byte until it
    ends. Weak spot: past PIECE_LIMIT bytes a piece is written as shown, masked, with a tail that
    may begin a form masked too: a form cut by that much hidden output loses its start, not all
    of it to `***`; what follows it still shows.
    """

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._held = b""

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        buf = self._held + data if self._held else data
        if not _hidden(buf):  # the common case: nothing hidden, the first pass has seen it all
            end = len(buf) if not buf or buf[-1] < 0x80 else _char_end(buf)
            self._held = buf[end:]  # an unfinished character: a piece may start right after it
            return buf[:end]
        end = max(buf.rfind(b"\n"), buf.rfind(b"\r")) + 1
        done = self._pieces(buf[:end]) if end else b""
        tail = buf[end:]
        keep = self._hold_from(tail)
        if len(tail) - keep > PIECE_LIMIT:
            self._held = b""
            return done + tail[:keep] + self._force(tail[keep:])
        self._held = tail[keep:]
        return done + tail[:keep]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return self._pieces(held)

    def _hold_from(self, tail: bytes) -> int:
        """Where to start holding the unfinished piece `tail`: up to `longest - 1` bytes before
        its first hidden byte (a form may begin there), at a character's start; when nothing in
        it is hidden, only an unfinished character at its end."""
        hidden = _HIDDEN.search(tail)
        if hidden is None:
            return _char_end(tail)
        i = max(0, hidden.start() - self._masker.longest + 1)
        while i > 0 and 0x80 <= tail[i] < 0xC0:  # a UTF-8 continuation byte
            i -= 1
        return i

    def _pieces(self, block: bytes) -> bytes:
        """Whole pieces: each one that shows a form is replaced by its shown text, masked."""
        if not block or not _hidden(block):
            return block
        # A quick test first: the block as shown (string controls end at a CR too, as the log
        # views split there) holds no needle: nothing to do.
        if not self._masker._candidate(_TOKENS.sub(b"", block.replace(b"\r", b"\n"))):
            return block
        parts = _PIECES.split(block)
        for k in range(0, len(parts), 2):
            piece = parts[k]
            if _HIDDEN.search(piece):
                shown = ansi.strip(piece.decode("utf-8", errors="replace"))
                masked = self._masker.mask(shown)
                if masked != shown:
                    parts[k] = masked.encode()
        return b"".join(parts)

    def _force(self, piece: bytes) -> bytes:
        """A piece past PIECE_LIMIT: written as shown, masked, with a tail that may begin a form
        masked as well (what follows cannot be joined to it); an unfinished character is kept."""
        end = _char_end(piece)
        self._held = piece[end:]
        shown = self._masker.mask(ansi.strip(piece[:end].decode("utf-8", errors="replace"))).encode()
        cut = self._masker._prefix_start(shown, 0)
        return shown if cut == len(shown) else shown[:cut] + MASK.encode()


def _hidden(data: bytes) -> bool:
    """Whether `data` holds a byte a log view does not show (see _HIDDEN)."""
    # translate is a plain C loop, several times faster than a regex search through text.
    return bool(data.translate(None, _NOT_SUSPECT)) and _HIDDEN.search(data) is not None


def _char_end(data: bytes) -> int:
    """The length of `data` without an unfinished UTF-8 character at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # the lead byte of the last character
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)
