"""Where in a TOML file each key is: line numbers for error messages (the one key locator).

tomllib gives no line numbers, so `_Scanner` walks the (already valid) TOML text once and
records the line of every table header, key and array item, by its path: ("stage", 0,
"action", 1, "name"). The pipeline validator, gitpipe.toml (settings.py) and secrets.toml
(secrets.py) all ask it; `line_of` gives the most precise line known for a place.

Quoted keys are taken as written: escapes in them are not decoded (such a key falls back to
its table's line). Standard library only: the git hook imports it.
"""

from __future__ import annotations

import re

from gitpipe.errors import ConfigError

KeyPath = tuple[str | int, ...]


def key_lines(text: str) -> dict[KeyPath, int]:
    """The line of every table header, key and array item of a valid TOML text, by its path
    (("stage", 0, "action", 1, "name") ...); a table's path also maps to its first line."""
    return _Scanner(text.removeprefix("\ufeff")).scan()


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int:
    """The line of `path`, else of its nearest parent that has one (inline tables); 0 if none."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 0


KEY_PART = re.compile(r'([A-Za-z0-9_-]+)|"((?:[^"\\\n]|\\.)*)"|\'([^\'\n]*)\'')
_SCALAR = re.compile(r"[^,\]}#\n]*")
_STRINGS = {
    '"': re.compile(r'"(?:[^"\\\n]|\\.)*"?'),
    "'": re.compile(r"'[^'\n]*'?"),
    '"""': re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*""""{0,2}', re.DOTALL),
    "'''": re.compile(r"'''(?:[^']|'(?!''))*''''{0,2}", re.DOTALL),
}


class _Scanner:
    """Records the line of every table header, key and array item of a valid TOML text."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.arrays: dict[KeyPath, int] = {}  # array of tables -> number of its [[headers]] so far

    def scan(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        while self._skip(newlines=True):
            start = self.i
            if self.s[self.i] == "[":
                table = self._header()
            else:
                self._keyval(table)
            if self.i == start:  # not valid TOML after all: never loop forever
                self._advance(1)
        return self.lines

    def _advance(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def _skip(self, newlines: bool) -> bool:
        """Skips blanks and comments (and newlines if asked); False at the end of the text."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._advance(1)
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return True
        return False

    def _record(self, path: KeyPath, line: int) -> None:
        for k in range(1, len(path)):
            self.lines.setdefault(path[:k], line)
        self.lines[path] = line

    def _header(self) -> KeyPath:
        double = self.s.startswith("[[", self.i)
        self._advance(2 if double else 1)
        line, parts = self.line, self._key()
        self._advance(2 if double else 1)
        path: KeyPath = ()
        for part in parts[:-1] if double else parts:
            path += (part,)
            if path in self.arrays:  # a dotted header goes into the latest [[element]]
                path += (self.arrays[path] - 1,)
        if double and parts:
            path += (parts[-1],)
            self.arrays[path] = self.arrays.get(path, 0) + 1
            path += (self.arrays[path] - 1,)
        self._record(path, line)
        return path

    def _key(self) -> list[str]:
        parts: list[str] = []
        while self._skip(newlines=False):
            match = KEY_PART.match(self.s, self.i)
            if match is None:
                break
            parts.append(next(g for g in match.groups() if g is not None))
            self._advance(match.end() - self.i)
            self._skip(newlines=False)
            if not self.s.startswith(".", self.i):
                break
            self._advance(1)
        return parts

    def _keyval(self, table: KeyPath) -> bool:
        line, parts = self.line, self._key()
        self._skip(newlines=False)
        if not parts or not self.s.startswith("=", self.i):
            return False
        path = table + tuple(parts)
        self._record(path, line)
        self._advance(1)
        self._skip(newlines=False)
        self._value(path)
        return True

    def _value(self, path: KeyPath) -> None:
        s, i = self.s, self.i
        if s.startswith("[", i):
            self._array(path)
        elif s.startswith("{", i):
            self._inline(path)
        else:
            quote = s[i:i + 3] if s.startswith(('"""', "'''"), i) else s[i:i + 1]
            match = (_STRINGS.get(quote) or _SCALAR).match(s, i)
            self._advance(max(match.end() - i, 1) if match else 1)

    def _array(self, path: KeyPath) -> None:
        self._advance(1)
        index = 0
        while self._skip(newlines=True):
            if self.s.startswith("]", self.i):
                self._advance(1)
                return
            self._record(path + (index,), self.line)
            self._value(path + (index,))
            self._skip(newlines=True)
            if self.s.startswith(",", self.i):
                self._advance(1)
                index += 1
            elif not self.s.startswith("]", self.i):
                return

    def _inline(self, path: KeyPath) -> None:
        self._advance(1)
        while self._skip(newlines=True):
            if self.s.startswith("}", self.i):
                self._advance(1)
                return
            if not self._keyval(path):
                return
            self._skip(newlines=True)
            if self.s.startswith(",", self.i):
                self._advance(1)
            elif not self.s.startswith("}", self.i):
                return


class Problems:
    """Every problem of one TOML file (gitpipe.toml, secrets.toml), each at the line of its key."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = key_lines(text) if text else {}
        self.found: list[ConfigError] = []

    def add(self, message: str, *path: str, hint: str | None = None) -> None:
        """A problem at `path` (("sandbox", "pids") ...), or at its table's line if the key is not written."""
        line = line_of(self.lines, path) or None
        self.found.append(ConfigError(message, file=self.file, line=line, hint=hint))

    def check(self) -> None:
        """Raise the problem found, or every problem at once (one per line, in line order)."""
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigError.every(self.found)
