"""Log files on the run page: the tail (and the failing part) inline, the whole as a text file.

A log may hold millions of lines: the page shows at most the last TAIL_LINES lines (and
TAIL_BYTES), plus the lines around the first error marker when the attempt failed and
that marker is not in the tail. Line numbers are those of the whole file, so a line's
link and the full log agree. Scans are remembered per file and resumed where they
stopped, so re-rendering the page of a running action only reads what is new.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from markupsafe import Markup, escape

from gitpipe import ansi

TAIL_LINES = 500
TAIL_BYTES = 256 * 1024
BEFORE, AFTER = 10, 30  # context lines around the first error marker
LINE_CHARS = 1000  # longer lines are cut on the page (never in the full log)
CHUNK = 1 << 20
STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
# A word on its own, or right after an SGR colour ("\x1b[31mERROR").
ERROR = re.compile(rb"(?i)(?:(?<![a-z0-9_])|(?<=\dm))(?:error|fatal|failed|failure|exception|traceback|"
                   rb"panic)(?![a-z0-9_])")


@dataclass(frozen=True)
class Line:
    """One log line: its number in the file and its HTML."""

    number: int
    html: Markup


@dataclass(frozen=True)
class Segment:
    """Consecutive lines shown together."""

    lines: tuple[Line, ...]
    failing: bool = False  # the part around the first error marker

    @property
    def first(self) -> int:
        return self.lines[0].number

    @property
    def last(self) -> int:
        return self.lines[-1].number

    def html(self, anchor: str) -> Markup:
        """The numbered, linkable lines (built here, not in the template: a page may hold
        thousands; every part is escaped: the anchor, and each line by ansi.to_html)."""
        a = escape(anchor)
        return Markup("".join(f'<div id="{a}-L{ln.number}"><a href="#{a}-L{ln.number}">{ln.number}</a>{ln.html}</div>\n'
                              for ln in self.lines))


@dataclass(frozen=True)
class Excerpt:
    """What of one log file the page shows."""

    total: int  # lines in the file
    size: int  # bytes
    segments: tuple[Segment, ...] = ()
    missing: bool = False

    @property
    def shown(self) -> int:
        return sum(len(s.lines) for s in self.segments)

    @property
    def truncated(self) -> bool:
        return self.shown < self.total


@dataclass
class _Scan:
    """How far a file was read: complete lines counted, the first error marker found."""

    offset: int = 0
    lines: int = 0
    error_line: int | None = None
    error_offset: int | None = None


class LogReader:
    """Builds excerpts of log files; remembers its scans (bounded) to resume them, and its
    last excerpts, since a run's page is rendered again at each change of the run."""

    def __init__(self, max_files: int = 512, max_excerpts: int = 64) -> None:
        self._scans: OrderedDict[str, _Scan] = OrderedDict()
        self._excerpts: OrderedDict[tuple[object, ...], Excerpt] = OrderedDict()
        self._lock = threading.Lock()
        self.max_files = max_files
        self.max_excerpts = max_excerpts

    def excerpt(self, path: Path, failing: bool, tail_lines: int = TAIL_LINES) -> Excerpt:
        """The tail of a log (and, when `failing`, the lines around its first error marker)."""
        try:
            st = path.stat()
        except OSError:
            return Excerpt(0, 0, missing=True)
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, failing, tail_lines)
        with self._lock:
            if key in self._excerpts:
                self._excerpts.move_to_end(key)
                return self._excerpts[key]
        excerpt = self._read(path, st.st_size, failing, tail_lines)
        with self._lock:
            self._excerpts[key] = excerpt
            while len(self._excerpts) > self.max_excerpts:
                self._excerpts.popitem(last=False)
        return excerpt

    def _read(self, path: Path, size: int, failing: bool, tail_lines: int) -> Excerpt:
        scan = self._scan(path, size)
        total = scan.lines + (1 if size > scan.offset else 0)
        with open(path, "rb") as f:
            tail = _tail(f, size, total, tail_lines)
            segments = [tail] if tail.lines else []
            if failing and scan.error_line is not None and scan.error_offset is not None and tail.lines \
                    and scan.error_line < tail.first:
                segments.insert(0, _around(f, scan.error_line, scan.error_offset, tail.first))
        return Excerpt(total, size, tuple(_merge(segments)))

    def _scan(self, path: Path, size: int) -> _Scan:
        key = str(path)
        with self._lock:
            scan = self._scans.pop(key, None)
            if scan is None or scan.offset > size:
                scan = _Scan()
            self._scans[key] = scan
            while len(self._scans) > self.max_files:
                self._scans.popitem(last=False)
        _resume(path, scan)
        return scan


def _resume(path: Path, scan: _Scan) -> None:
    """Count the complete lines after `scan.offset`; note the first error marker."""
    with open(path, "rb") as f:
        f.seek(scan.offset)
        carry = b""
        while chunk := f.read(CHUNK):
            buf = carry + chunk
            end = buf.rfind(b"\n") + 1
            whole, carry = buf[:end], buf[end:]
            if scan.error_line is None:
                _find_error(whole, scan)
            scan.lines += whole.count(b"\n")
            scan.offset += end


def _find_error(data: bytes, scan: _Scan) -> None:
    m = ERROR.search(data)
    if m is None:
        return
    start = data.rfind(b"\n", 0, m.start()) + 1
    scan.error_line = scan.lines + data.count(b"\n", 0, m.start()) + 1
    scan.error_offset = scan.offset + start


def _tail(f: BinaryIO, size: int, total: int, count: int) -> Segment:
    """The last `count` lines (within TAIL_BYTES)."""
    start = max(0, size - TAIL_BYTES)
    f.seek(start)
    data = f.read(size - start)
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    if start > 0 and len(raw) > 1:
        raw.pop(0)  # a partial line (kept when the last line alone is longer than TAIL_BYTES)
    raw = raw[-count:]
    first = total - len(raw) + 1
    return Segment(tuple(Line(first + i, render_line(r)) for i, r in enumerate(raw)))


def _around(f: BinaryIO, line: int, offset: int, limit: int) -> Segment:
    """BEFORE lines before the line at `offset`, it, and AFTER lines after (all before `limit`)."""
    lo = max(0, offset - 64 * 1024)
    f.seek(lo)
    before = f.read(offset - lo).split(b"\n")[:-1]
    if lo > 0 and before:
        before.pop(0)
    before = before[-BEFORE:]
    after = f.read(256 * 1024).split(b"\n")[:AFTER + 1]
    raw = before + after
    first = line - len(before)
    lines = [Line(first + i, render_line(r)) for i, r in enumerate(raw) if first + i < limit]
    return Segment(tuple(lines), failing=True)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join segments that touch, so no "0 lines hidden" gap is shown."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].last + 1 >= seg.first:
            prev = out.pop()
            seg = Segment(prev.lines + tuple(x for x in seg.lines if x.number > prev.last),
                          prev.failing or seg.failing)
        out.append(seg)
    return out


def visible_text(raw: bytes, keep_stamp: bool = False) -> str:
    """A log line as a terminal would leave it: the part after the last carriage return."""
    parts = [p for p in raw.rstrip(b"\r").split(b"\r") if p]
    last = parts[-1] if parts else b""
    if not keep_stamp:
        last = STAMP.sub(b"", last)
    return last.decode("utf-8", errors="replace")


def render_line(raw: bytes) -> Markup:
    """One log line as HTML: colours kept, everything else escaped, long lines cut."""
    text = visible_text(raw)
    if len(text) <= LINE_CHARS:
        return ansi.to_html(text)
    cut = len(text) - LINE_CHARS
    return ansi.to_html(text[:LINE_CHARS]) + Markup('<span class="cut">… {} more characters</span>').format(cut)


def write_plain(src: Path, dest: Path) -> None:
    """The whole log as plain text (timestamps kept, escapes removed), written atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(src, "rb") as fin, open(tmp, "w", encoding="utf-8") as fout:
        carry = b""
        while chunk := fin.read(CHUNK):
            buf = carry + chunk
            end = buf.rfind(b"\n") + 1
            fout.write(_plain(buf[:end]))
            carry = buf[end:]
        if carry:
            fout.write(_plain(carry + b"\n"))
    os.replace(tmp, dest)


def _plain(lines: bytes) -> str:
    """Complete lines as plain text; lines with carriage returns keep their last state."""
    if b"\r" not in lines:
        return ansi.strip(lines.decode("utf-8", errors="replace"))
    return "".join(ansi.strip(visible_text(raw, keep_stamp=True)) + "\n" for raw in lines.split(b"\n")[:-1])
