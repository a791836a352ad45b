"""jinja2 (the only place gitpipe uses it): templates/ into HTML, escaping on everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from gitpipe import __version__, ansi, resources
from gitpipe.report import fmt

TYPE_CHECKING = False
if TYPE_CHECKING:
    import jinja2

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; "
       "base-uri 'none'; form-action 'none'")
REFRESH = 5  # seconds between reloads of a page that shows unfinished runs


def environment(compiled: Path | None = None) -> jinja2.Environment:
    """The template environment: autoescape for every template, undefined names are errors, and
    every value printed without its escape sequences and control characters (`_plain`).
    `compiled`: a folder keeping the compiled templates between processes (jinja2 checks each
    against its source), for the daemon's short-lived rendering process (report.child)."""
    import jinja2  # ~10 MB and ~17 ms: loaded when the first page is rendered, not by an idle daemon

    cache = None
    if compiled is not None:
        compiled.mkdir(mode=0o700, parents=True, exist_ok=True)
        cache = jinja2.FileSystemBytecodeCache(str(compiled))  # first page 90 -> 20 ms (issue 11)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.folder("templates"))),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        finalize=_plain, bytecode_cache=cache)
    env.filters.update(duration=fmt.duration, when=fmt.when, size=fmt.size)
    env.globals.update(csp=CSP, refresh=REFRESH, version=__version__)
    return env


def _plain(value: Any) -> Any:
    """What `{{ value }}` prints: pushed text (commit messages, outputs, errors, deploy output) with
    the escapes `gitpipe logs` drops dropped here too, so no page carries a raw ESC or control byte.
    Markup is HTML built by gitpipe (ansi.to_html, macros): already filtered."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return ansi.strip(value)
    return value


class Renderer:
    """Renders the named templates; one per Reporter (jinja caches the compiled templates)."""

    def __init__(self, compiled: Path | None = None) -> None:
        self._env: jinja2.Environment | None = None
        self._compiled = compiled

    @property
    def env(self) -> jinja2.Environment:
        if self._env is None:
            self._env = environment(self._compiled)
        return self._env

    def page(self, template: str, root: str, **context: Any) -> str:
        """A page; `root` is the relative path from it to the site root ("", "../", "../../")."""
        return self.env.get_template(template).render(root=root, generated=fmt.now_iso(), **context)

    def stylesheet(self) -> str:
        """site.css with the 256-colour palette of log colours appended."""
        return self.env.get_template("site.css").render(palette=list(enumerate(ansi.palette_256(), 16)))

    def script(self) -> str:
        """site.js as it is (not a template)."""
        return (resources.folder("templates") / "site.js").read_text(encoding="utf-8")
