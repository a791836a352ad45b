"""`gitpipe edit`: the editor's local web server.

werkzeug serves it: a small, maintained WSGI toolkit from the makers of jinja2 (already a
dependency), with a threaded server that binds port 0 and parses requests and JSON for us;
one page for one user on 127.0.0.1 needs nothing bigger (no async framework, no ASGI server).

Who may talk to it: only requests that carry the token made at start (in the page's URL,
then in a header of every API call), whose Host is a local name (any port: an `ssh -L`
tunnel has its own) and whose Origin (when sent) is that same address. That keeps out other local users' pages, other
sites in the browser, and DNS rebinding. The page loads nothing from outside (its CSS and JS
are inlined; the Content-Security-Policy forbids any other source).
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from gitpipe import keys
from gitpipe.editor import check, templates
from gitpipe.errors import EditError, GitpipeError, UsageError

MAX_BODY = 4 * 1024 * 1024
SCRIPT_PARTS = ("core.js", "graph.js", "form.js", "main.js")
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")  # a Host naming anything else is DNS rebinding


def digest(text: str | None) -> str:
    """What the page sends back on save, to tell whether the file changed on disk meanwhile."""
    return "" if text is None else hashlib.sha256(text.encode()).hexdigest()


class Editor:
    """The WSGI application of one `gitpipe edit` session: one file, one token."""

    def __init__(self, path: Path, template: str | None = None) -> None:
        self.path = path
        self.token = secrets.token_urlsafe(24)
        self.port = 0
        self.template = template

    # ------------------------------------------------------------------ guard

    def allowed(self, request: Request) -> str | None:
        """Why a request is refused, or None."""
        name, _, port = request.host.rpartition(":")
        if name not in LOCAL_NAMES or not port.isdigit():  # any port: an `ssh -L` tunnel has its own
            return f"wrong Host header {request.host!r}: open the address gitpipe edit printed"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return f"requests from {origin!r} are not accepted"
        given = request.args.get("token", "") if request.path == "/" else request.headers.get("X-Gitpipe-Token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return "missing or wrong token: open the full URL gitpipe edit printed"
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        request.max_content_length = MAX_BODY
        refused = self.allowed(request)
        if refused:
            response = Response(f"gitpipe edit: {refused}\n", status=403, mimetype="text/plain")
        else:
            try:
                response = self.dispatch(request)
            except HTTPException as exc:
                response = Response(f"gitpipe edit: {exc.description}\n", status=exc.code, mimetype="text/plain")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response(environ, start_response)

    # ------------------------------------------------------------------ routes

    def dispatch(self, request: Request) -> Response:
        if request.path == "/" and request.method == "GET":
            try:
                return self.page()
            except EditError as exc:
                return Response(f"gitpipe edit: {exc}\n", status=409, mimetype="text/plain")
        route = {"/api/check": self.api_check, "/api/edit": self.api_edit, "/api/save": self.api_save,
                 "/api/reload": self.api_reload, "/api/diff": self.api_diff}.get(request.path)
        if route is None or request.method != "POST":
            return Response("gitpipe edit: not found\n", status=404, mimetype="text/plain")
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            return _json({"error": "the request body must be a JSON object"}, 400)
        try:
            return _json(route(body))
        except EditError as exc:
            return _json({"error": str(exc)}, 409)
        except OSError as exc:
            return _json({"error": f"{exc.strerror or exc}: {self.path}"}, 500)

    def disk(self) -> str | None:
        """The file's text now; None if there is no file."""
        return read(self.path, EditError)

    def state(self) -> dict[str, Any]:
        on_disk = self.disk()  # read once: the text shown and the base of a later save must agree
        text = on_disk
        if text is None:
            text = templates.TEMPLATES[self.template][1] if self.template else ""
        return {"file": str(self.path), "exists": on_disk is not None, "text": text, "base": digest(on_disk),
                "templates": {k: {"title": t, "text": v} for k, (t, v) in templates.TEMPLATES.items()},
                "keys": _key_help(), "check": check.check(text, self.path.name) if text else None}

    def page(self) -> Response:
        nonce = secrets.token_urlsafe(16)
        static = resources.files("gitpipe.editor") / "static"
        html = (static / "editor.html").read_text(encoding="utf-8")
        parts = {"nonce": nonce, "css": (static / "editor.css").read_text(encoding="utf-8"),
                 "state": json.dumps(self.state()).replace("<", "\\u003c"),  # no "</script>" or "<!--"
                 "js": _script(static)}
        html = re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m[1]], html)  # one pass: no text is read twice
        response = Response(html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
        return response

    def api_check(self, body: dict[str, Any]) -> dict[str, Any]:
        return check.check(_text(body), self.path.name)

    def api_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if not isinstance(op, dict) or not isinstance(op.get("kind"), str) or not isinstance(op.get("args"), dict):
            raise EditError('"op" must be {"kind": ..., "args": {...}}')
        from gitpipe.editor import model  # tomlkit: only once the page asks for an edit

        text = model.apply(_text(body), model.Op(op["kind"], op["args"]))
        return {"text": text, "check": check.check(text, self.path.name)}

    def api_save(self, body: dict[str, Any]) -> dict[str, Any]:
        text, on_disk = _text(body), self.disk()
        if digest(on_disk) != body.get("base") and not body.get("force"):
            return {"changed": True, "diff": _diff(on_disk or "", text, str(self.path)), "disk": on_disk}
        _write(self.path, text)
        return {"saved": True, "base": digest(text)}

    def api_reload(self, body: dict[str, Any]) -> dict[str, Any]:
        on_disk = self.disk()
        text = on_disk or ""
        return {"text": text, "base": digest(on_disk), "check": check.check(text, self.path.name)}

    def api_diff(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"diff": _diff(self.disk() or "", _text(body), str(self.path))}


def read(path: Path, error: type[GitpipeError]) -> str | None:
    """The text of `path`, None if it does not exist; `error` if it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {exc.start})",
                    hint="save the file as UTF-8, then run gitpipe edit again") from None


def _script(static: Any) -> str:
    """The page's script: its parts in one function (they share its variables), strict."""
    parts = [(static / name).read_text(encoding="utf-8") for name in SCRIPT_PARTS]
    return '(function () {\n"use strict";\n' + "\n".join(parts) + "})();\n"


def _text(body: dict[str, Any]) -> str:
    text = body.get("text")
    if not isinstance(text, str):
        raise EditError('"text" must be a string')
    return text


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"{name} (on disk)", f"{name} (in the editor)"))


def _key_help() -> dict[str, Any]:
    """The action keys for the forms, from the same definitions as the validator."""
    from gitpipe.actionspec import plugin_types

    return {"action": [{"name": k.name, "kind": k.kind, "help": k.help, "default": k.default,
                        "choices": list(k.choices), "minimum": k.minimum, "required": k.required,
                        "types": list(k.types)} for k in keys.ACTION],
            "types": [*keys.ACTION_TYPES, *sorted(plugin_types())], "plugin": keys.PLUGIN}


def _write(path: Path, text: str) -> None:
    """Replace the file whole or not at all, keeping its mode."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _has_browser() -> bool:
    """A graphical browser to open: never a text one taking over this terminal."""
    if sys.platform != "darwin" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def _open(url: str) -> None:
    """Open the browser on a private file that redirects to `url`: the token never shows in
    the browser's command line, which any local user can read in `ps` (as Jupyter does)."""
    folder = Path(tempfile.mkdtemp(prefix="gitpipe-edit-"))  # mode 0700
    # removed when the editor stops, however early (a Ctrl-C while the browser starts)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    page = folder / "open.html"
    page.write_text(f'<!doctype html><meta http-equiv="refresh" content="0;url={url}">'
                    f'<a href="{url}">open gitpipe edit</a>\n', encoding="utf-8")
    page.chmod(0o600)
    webbrowser.open(page.as_uri())  # the browser reads it at once


def run(path: Path, template: str | None, open_browser: bool, say: Callable[[str], None]) -> None:
    """Serve the editor for `path` until Ctrl-C."""
    if path.is_dir():
        path = path / ".pipeline.toml"
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent} is not a directory", hint="give a file in an existing directory")
    if path.exists() and template:
        raise UsageError(f"{path} exists; --template is only for a new file")
    read(path, UsageError)  # a file that is not UTF-8: say so now, not in the page
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = Editor(path, template)
    try:
        server = make_server("127.0.0.1", 0, app, threaded=True)
    except OSError as exc:
        raise GitpipeError(f"cannot listen on 127.0.0.1: {exc.strerror or exc}") from None
    app.port = server.server_port
    url = f"http://127.0.0.1:{app.port}/?token={app.token}"
    say(f"gitpipe edit: {path} at {url}")
    say("(the token in the URL is what lets you in; Ctrl-C stops the editor)")
    # While the browser starts: load what the first page needs (the plugin list, the validator).
    threading.Thread(target=app.page, name="warm-up", daemon=True).start()
    try:
        if open_browser and _has_browser():
            _open(url)  # a Ctrl-C while it waits for the browser stops the editor as well
        server.serve_forever()  # werkzeug's returns on Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    say("gitpipe edit: stopped")
