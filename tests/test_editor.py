"""`gitpipe edit`: the real command serving a real file, driven in headless Chromium.

The scenarios of issue 9: edits in the graph and the form keep every comment and change only
what was edited; an error typed into the text shows on its node and line and goes when fixed;
a file changed on disk is not overwritten; requests without the token or from another origin
are refused. Plus the tomlkit edits on their own, and screenshots in both themes.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import DESKTOP, PHONE, Tab, browser, screenshot
from helpers import GITPIPE, base_env, wait_for

from gitpipe import pipeline
from gitpipe.editor import model, server
from gitpipe.errors import EditError

DATA = Path(__file__).resolve().parent / "data"
ORIGINAL = (DATA / "commented.pipeline.toml").read_text()
LAPTOP = {"width": 1280, "height": 800}


@dataclass
class Editor:
    """A running `gitpipe edit` on `file`."""

    proc: subprocess.Popen[str]
    file: Path
    url: str

    @property
    def port(self) -> int:
        return int(re.search(r":(\d+)/", self.url)[1])  # type: ignore[index]

    @property
    def token(self) -> str:
        return self.url.split("token=", 1)[1]


def start(file: Path, *args: str) -> Editor:
    proc = subprocess.Popen([GITPIPE, "edit", "--no-browser", *args, str(file)], cwd=file.parent,
                            env=base_env(HOME=str(file.parent)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"gitpipe edit printed no URL: {line!r}")
    return Editor(proc, file, match[0])


@pytest.fixture
def editor(tmp_path: Path) -> Iterator[Editor]:
    file = tmp_path / ".pipeline.toml"
    file.write_text(ORIGINAL)
    ed = start(file)
    yield ed
    if ed.proc.poll() is None:
        ed.proc.send_signal(signal.SIGINT)
        ed.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as b:
        yield b


def open_editor(chromium: Any, ed: Editor, viewport: dict[str, int] | None = None, dark: bool = False) -> Tab:
    tab = Tab(chromium, viewport or LAPTOP, dark)
    tab.visit(ed.url).wait_for_selector("body[data-ready]")
    return tab


def node(page: Any, name: str) -> Any:
    return page.locator(f'.node[data-name="{name}"]')


def text_of(page: Any) -> str:
    return page.evaluate("window.gitpipeEditor.text")


def settle(page: Any) -> None:
    """Wait until the page has shown the answer to its latest request."""
    page.wait_for_function("() => !window.gitpipeEditor.pending && window.gitpipeEditor.shown === window.gitpipeEditor.seq")


def set_field(page: Any, key: str, value: str) -> None:
    control = page.locator(f'.form .field[data-key="{key}"] input, .form .field[data-key="{key}"] textarea').first
    control.fill(value)
    control.dispatch_event("change")
    settle(page)


# --------------------------------------------------------------------------- in the browser


def test_graph_and_form_edits_keep_every_comment(chromium: Any, editor: Editor) -> None:
    """Add a stage, move an action across stages, rename a producer, edit a deploy's targets,
    save: the file validates, every comment is kept, and only the edited lines changed."""
    tab = open_editor(chromium, editor)
    page = tab.page
    assert page.locator(".node").count() == 4
    assert page.locator(".graph .edge").count() == 2  # wheel -> unit, wheel -> deploy

    page.click("#add-stage")
    settle(page)
    assert page.locator(".stage-head").count() == 4

    node(page, "lint").drag_to(page.locator('.lane[data-stage="1"]'))
    settle(page)
    assert node(page, "lint").get_attribute("data-stage") == "1"

    node(page, "wheel").click()
    set_field(page, "name", "dist")
    assert node(page, "dist").count() == 1
    assert page.locator(".graph .edge").count() == 2  # the consumers follow the new name

    node(page, "deploy").click()
    set_field(page, "target", "ssh://deploy@web1.example.com/srv/shop\nssh://deploy@web2.example.com/srv/shop")
    assert page.locator("#count").inner_text() == "0"

    page.click("#save")
    page.wait_for_function("() => document.getElementById('status').textContent === 'saved'")
    saved = editor.file.read_text()
    assert saved == text_of(page)
    check = subprocess.run([GITPIPE, "validate", str(editor.file)], capture_output=True, text=True, env=base_env())
    assert check.returncode == 0, check.stderr

    comments = [line.strip() for line in ORIGINAL.splitlines() if "#" in line]
    for comment in comments:
        assert any(c.strip().endswith(comment.split("#", 1)[1].strip()) for c in saved.splitlines() if "#" in c), comment
    # Only what was edited changed: the file is the original with exactly these edits made by hand.
    lint = '\n  # lint needs no wheel\n  [[stage.action]]\n  name = "lint"                      # fast, so it sits here' \
           '\n  run = "ruff check ."\n'
    expected = ORIGINAL.replace(lint, "").replace('pytest -q\n"""\n', 'pytest -q\n"""\n' + lint)
    for old, new in [('name = "wheel"', 'name = "dist"'), ("{ wheel = ", "{ dist = "), ('["wheel"]', '["dist"]'),
                     ("GITPIPE_OUT_WHEEL_", "GITPIPE_OUT_DIST_"),
                     ('target = "ssh://deploy@staging.example.com/srv/shop"',
                      'target = ["ssh://deploy@web1.example.com/srv/shop", "ssh://deploy@web2.example.com/srv/shop"]')]:
        assert old in expected
        expected = expected.replace(old, new)
    expected += '\n[[stage]]\nname = "stage-4"\n\n  [[stage.action]]\n  name = "step"\n  run = "echo \\"hello from gitpipe\\""\n'
    assert saved == expected, "".join(difflib.unified_diff(expected.splitlines(True), saved.splitlines(True)))
    parsed = pipeline.parse(saved)
    assert [s.name for s in parsed.stages] == ["build", "test", "staging", "stage-4"]
    assert [a.name for a in parsed.stages[1].actions] == ["unit", "lint"]
    assert parsed.stages[2].actions[0].inputs == ("dist",)
    assert tab.console.problems() == []


def test_undo_redo_and_keyboard_moves(chromium: Any, editor: Editor) -> None:
    page = open_editor(chromium, editor).page
    node(page, "lint").focus()
    page.keyboard.press("Alt+ArrowRight")
    settle(page)
    assert node(page, "lint").get_attribute("data-stage") == "1"
    assert page.evaluate("document.activeElement.dataset.name") == "lint"  # focus stays on it
    moved = text_of(page)
    page.keyboard.press("Control+z")
    settle(page)
    assert text_of(page) == ORIGINAL and node(page, "lint").get_attribute("data-stage") == "0"
    page.keyboard.press("Control+Shift+z")
    settle(page)
    assert text_of(page) == moved
    page.locator('.stage-head[data-stage="2"]').focus()
    page.keyboard.press("Alt+ArrowLeft")
    settle(page)
    assert page.locator('.stage-head[data-stage="1"]').inner_text() == "staging"
    page.locator('.stage-head[data-stage="2"]').drag_to(page.locator('.stage-head[data-stage="0"]'))
    settle(page)
    assert [h.inner_text() for h in page.locator(".stage-head").all()] == ["test", "build", "staging"]
    assert "runs later" in page.locator("#problems").inner_text()  # unit now runs before its wheel
    assert "bad" in (node(page, "unit").get_attribute("class") or "")
    assert page.locator(".graph .edge.backwards").count() == 1


def test_deleting_a_producer_asks_about_its_consumers(chromium: Any, editor: Editor) -> None:
    page = open_editor(chromium, editor).page
    node(page, "lint").click()
    assert "no earlier action has outputs" in page.locator('.field[data-key="inputs"]').inner_text()
    node(page, "unit").click()
    offered = page.locator('.field[data-key="inputs"] input[type="checkbox"]')
    assert offered.count() == 1 and offered.get_attribute("value") == "wheel" and offered.is_checked()
    node(page, "wheel").click()
    page.locator(".form").get_by_role("button", name="Delete").click()
    question = page.locator("#dialog").inner_text()
    assert "test / unit" in question and "staging / deploy" in question
    page.get_by_role("button", name="Remove those inputs").click()
    settle(page)
    assert node(page, "wheel").count() == 0 and page.locator(".graph .edge").count() == 0
    assert "inputs" not in text_of(page) and page.locator("#count").inner_text() == "0"
    assert "# needs the build package" not in text_of(page)  # the deleted action's own comment went with it
    assert "# lint needs no wheel" in text_of(page)


def test_an_error_typed_in_the_text_shows_on_its_node_and_line(chromium: Any, editor: Editor) -> None:
    tab = open_editor(chromium, editor)
    page = tab.page
    line = ORIGINAL.splitlines().index('  timeout = "10m"') + 1  # the wheel action's
    end = len("\n".join(ORIGINAL.splitlines()[:line]))
    page.locator("#text").focus()
    page.evaluate(f"document.getElementById('text').setSelectionRange({end}, {end})")
    page.keyboard.type("\n  retries = -1")
    settle(page)
    assert node(page, "wheel").get_attribute("class").split().count("bad") == 1
    assert node(page, "unit").get_attribute("class").split().count("bad") == 0
    assert page.locator(f'#gutter [data-line="{line + 1}"]').get_attribute("class") == "bad"
    assert page.locator(f'#marks [data-line="{line + 1}"]').count() == 1  # the line is marked in the text
    assert "retries" in page.locator("#problems").inner_text()
    assert page.locator("#count").inner_text() == "1"
    screenshot(page, "editor-error", full=False)

    page.keyboard.type("x = [")  # not TOML any more: the last good graph stays, the error is pinned
    settle(page)
    assert not page.locator("#stale").is_hidden()
    assert page.locator(".node").count() == 4
    assert "invalid TOML" in page.locator("#problems").inner_text()
    assert node(page, "wheel").get_attribute("class").split().count("bad") == 1

    for _ in range(len("\n  retries = -1x = [")):
        page.keyboard.press("Backspace")
    settle(page)
    assert text_of(page) == ORIGINAL
    assert page.locator(".node.bad").count() == 0 and page.locator("#gutter .bad").count() == 0
    assert page.locator("#marks div").count() == 0
    assert page.locator("#count").inner_text() == "0" and page.locator("#stale").is_hidden()
    assert tab.console.problems() == []


def test_a_file_changed_on_disk_is_not_overwritten(chromium: Any, editor: Editor) -> None:
    page = open_editor(chromium, editor).page
    node(page, "lint").click()
    set_field(page, "name", "ruff")
    theirs = ORIGINAL.replace("# Keep the stages short", "# Someone else's edit")
    editor.file.write_text(theirs)
    page.click("#save")
    page.wait_for_selector("#banner:not([hidden])")
    assert "changed on disk" in page.locator("#banner").inner_text()
    assert editor.file.read_text() == theirs
    page.get_by_role("button", name="Show the difference").click()
    diff = page.locator("#dialog pre").inner_text()
    assert "-# Someone else's edit" in diff and '+  name = "ruff"' in diff
    page.get_by_role("button", name="Close").click()
    page.get_by_role("button", name="Reload from disk").click()
    settle(page)
    assert text_of(page) == theirs and page.locator("#banner").is_hidden()
    assert editor.file.read_text() == theirs


def test_markup_in_the_file_stays_text(chromium: Any, tmp_path: Path) -> None:
    """A pipeline is pushed data: markup in its names, comments or scripts is shown, never run."""
    file = tmp_path / ".pipeline.toml"
    hostile = ORIGINAL.replace("# the one staging box", "# </script><script>window.pwned=1</script> <!--") \
        .replace('name = "lint"', 'name = "<img src=x onerror=window.pwned=2>"')
    file.write_text(hostile)
    ed = start(file)
    try:
        tab = open_editor(chromium, ed)
        page = tab.page
        assert text_of(page) == hostile and page.locator("#text").input_value() == hostile
        assert page.evaluate("window.pwned === undefined")
        assert page.locator(".node").nth(1).get_attribute("data-name") == "<img src=x onerror=window.pwned=2>"
        assert page.locator(".node .name").nth(1).inner_text().startswith("<img src=x")  # as text
        assert page.locator(".graph img").count() == 0
        assert tab.console.problems() == []
    finally:
        ed.proc.send_signal(signal.SIGINT)
        ed.proc.wait(timeout=20)


def test_a_new_file_starts_from_a_template(chromium: Any, tmp_path: Path) -> None:
    ed = start(tmp_path / ".pipeline.toml")
    try:
        page = open_editor(chromium, ed).page
        assert page.locator(".choices button").count() == 3
        page.click('.choices button[data-template="site"]')
        settle(page)
        assert node(page, "sign-off").count() == 1
        page.keyboard.press("Control+s")
        page.wait_for_function("() => document.getElementById('status').textContent === 'saved'")
        pipeline.parse(ed.file.read_text())
    finally:
        ed.proc.send_signal(signal.SIGINT)
        assert ed.proc.wait(timeout=20) == 0
        assert "stopped" in (ed.proc.stdout.read() if ed.proc.stdout else "")


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_screenshots(chromium: Any, editor: Editor, dark: bool) -> None:
    """The editor at 1280x800 and at phone width, each theme; nothing wider than a phone."""
    theme = "dark" if dark else "light"
    tab = Tab(chromium, LAPTOP, dark)
    requested: list[str] = []
    tab.page.on("request", lambda r: requested.append(r.url))
    tab.visit(editor.url).wait_for_selector("body[data-ready]")
    node(tab.page, "deploy").click()
    screenshot(tab.page, f"editor-{theme}", full=False)
    tab.page.locator("#text").focus()
    page = tab.visit(editor.url, viewport=PHONE)
    page.wait_for_selector("body[data-ready]")
    node(page, "unit").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, f"editor-phone-{theme}")
    tab.visit(editor.url, viewport=DESKTOP)
    assert tab.console.problems() == []
    # works offline: every request the page made went to the editor itself
    assert requested and all(u.startswith(f"http://127.0.0.1:{editor.port}/") for u in requested), requested
    tab.page.click("#theme")  # the switch overrides the browser's scheme
    assert tab.page.evaluate("document.documentElement.dataset.theme") == ("light" if dark else "dark")


# --------------------------------------------------------------------------- the server's guard


def request(ed: Editor, path: str, *, token: str | None = None, origin: str | None = None,
            host: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Gitpipe-Token"] = token
    if origin is not None:
        headers["Origin"] = origin
    if host is not None:
        headers["Host"] = host
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{ed.port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_requests_without_the_token_or_from_elsewhere_are_refused(editor: Editor) -> None:
    good = f"http://127.0.0.1:{editor.port}"
    body = {"text": ORIGINAL}
    assert request(editor, "/")[0] == 403
    assert request(editor, "/?token=wrong")[0] == 403
    assert request(editor, "/api/check", body=body)[0] == 403
    assert request(editor, "/api/check", token="wrong", body=body)[0] == 403
    status, text = request(editor, "/api/check", token=editor.token, origin="http://evil.example", body=body)
    assert status == 403 and "not accepted" in text
    assert request(editor, "/api/check", token=editor.token, host=f"evil.example:{editor.port}", body=body)[0] == 403
    assert request(editor, f"/?token={editor.token}", host=f"127.0.0.1.evil.example:{editor.port}")[0] == 403
    # through `ssh -L 8000:127.0.0.1:PORT` the browser says localhost:8000, and that is fine
    status, _ = request(editor, "/api/check", token=editor.token, host="localhost:8000",
                        origin="http://localhost:8000", body=body)
    assert status == 200
    assert request(editor, "/api/check", token=editor.token, host="localhost:8000",
                   origin="http://localhost:9000", body=body)[0] == 403
    before = editor.file.read_text()
    assert request(editor, "/api/save", token=editor.token, origin="http://evil.example",
                   body={"text": "x", "base": ""})[0] == 403
    assert editor.file.read_text() == before
    status, text = request(editor, "/api/check", token=editor.token, origin=good, body=body)
    assert status == 200 and json.loads(text)["problems"] == []
    assert request(editor, f"/?token={editor.token}")[0] == 200


def test_save_refuses_a_stale_base_and_reports_bad_requests(editor: Editor) -> None:
    status, text = request(editor, "/api/save", token=editor.token, body={"text": "x", "base": "stale"})
    assert status == 200 and json.loads(text)["changed"] is True
    assert editor.file.read_text() == ORIGINAL
    status, text = request(editor, "/api/edit", token=editor.token, body={"text": "[[", "op": {"kind": "add_stage",
                                                                                                "args": {}}})
    assert status == 409 and "fix the TOML first" in json.loads(text)["error"]


def _with_browser(tmp_path: Path, script: str) -> subprocess.Popen[str]:
    """`gitpipe edit` of a new copy of ORIGINAL with a display, its $BROWSER the sh `script`."""
    fake = tmp_path / "fake-browser"
    fake.write_text(f"#!/bin/sh\n{script}")
    fake.chmod(0o755)
    file = tmp_path / ".pipeline.toml"
    file.write_text(ORIGINAL)
    return subprocess.Popen([GITPIPE, "edit", str(file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=base_env(DISPLAY=":99", BROWSER=str(fake), HOME=str(tmp_path)))


def test_the_browser_is_opened_without_the_token_on_its_command_line(tmp_path: Path) -> None:
    """With a display, the browser gets a private file that redirects to the URL: `ps` shows
    the browser's arguments to every local user, the token must not be among them."""
    seen = tmp_path / "argv.txt"
    proc = _with_browser(tmp_path, f'printf "%s\\n" "$@" > {seen}\ncat "${{1#file://}}" >> {seen}\n')
    try:
        url = re.search(r"http://\S+", proc.stdout.readline() if proc.stdout else "")[0]  # type: ignore[index]
        token = url.split("token=")[1]
        argv, _, page = wait_for(lambda: seen.exists() and "refresh" in seen.read_text() and seen.read_text(),
                                 what="the browser to be started").partition("<!doctype")
        assert token not in argv and argv.startswith("file:///") and argv.strip().endswith("open.html")
        assert url in page
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    assert not Path(argv.strip()[len("file://"):]).exists()  # removed when the editor stopped


def test_ctrl_c_while_the_browser_starts_stops_the_editor_cleanly(tmp_path: Path) -> None:
    """The editor waits for the browser command (webbrowser does, for $BROWSER): a Ctrl-C then
    stopped it with a traceback's exit status and left the token's page on disk."""
    started = tmp_path / "started"
    proc = _with_browser(tmp_path, f'echo $$ > {started}.pid\nprintf "%s" "$1" > {started}\n'
                                   'exec sleep 60 </dev/null >/dev/null 2>&1\n')
    try:
        page = Path(wait_for(lambda: started.exists() and started.read_text(), what="the browser to start")[7:])
        assert page.exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        output = proc.stdout.read() if proc.stdout else ""
        assert "gitpipe edit: stopped" in output and "Traceback" not in output
        assert not page.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if Path(f"{started}.pid").exists():
            os.kill(int(Path(f"{started}.pid").read_text()), signal.SIGKILL)


def test_a_file_that_is_not_utf8_is_refused_before_serving(tmp_path: Path) -> None:
    file = tmp_path / ".pipeline.toml"
    file.write_bytes(b'[pipeline]\nname = "caf\xe9"\n')
    proc = subprocess.run([GITPIPE, "edit", "--no-browser", str(file)], capture_output=True, text=True,
                          env=base_env(), timeout=60)
    assert proc.returncode == 2
    assert f"{file}:2: not UTF-8 text" in proc.stderr and "save the file as UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_existing_file_with_a_template_is_refused(tmp_path: Path) -> None:
    file = tmp_path / ".pipeline.toml"
    file.write_text(ORIGINAL)
    proc = subprocess.run([GITPIPE, "edit", "--no-browser", "--template", "python", str(file)],
                          capture_output=True, text=True, env=base_env(), timeout=60)
    assert proc.returncode == 2 and "only for a new file" in proc.stderr
    assert file.read_text() == ORIGINAL


# --------------------------------------------------------------------------- the edits themselves


def edit(text: str, kind: str, **args: Any) -> str:
    return model.apply(text, model.Op(kind, args))


def test_renaming_a_producer_renames_its_consumers_references() -> None:
    out = edit(ORIGINAL, "rename_action", stage=0, action=0, name="py-wheel")
    assert 'outputs = { py-wheel = "dist/*.whl" }' in out
    assert out.count('inputs = ["py-wheel"]') == 2
    assert "$GITPIPE_OUT_PY_WHEEL_VERSION" in out and "WHEEL_VERSION\"" not in out.replace("PY_WHEEL", "")
    pipeline.parse(out)


COMMENTED = """\
[env]
A = "1"

# about stage a
[[stage]]
name = "a"

  # about a1
  [[stage.action]]
  name = "a1"
  run = "x"

  # about a2
  [[stage.action]]
  name = "a2"
  run = "x"

# about stage b
[[stage]]
name = "b"

  [[stage.action]]
  name = "b1"
  run = "x"
"""


def _above(text: str, header: str) -> str:
    """The comment line right above the header that names `header`."""
    lines = text.splitlines()
    at = lines.index(f'name = "{header}"') if f'name = "{header}"' in lines else lines.index(f'  name = "{header}"')
    return lines[at - 2].strip()


def test_comments_above_a_header_move_with_it_and_others_stay() -> None:
    for kind, args in [("move_stage", {"stage": 1, "to": 0}), ("move_stage", {"stage": 0, "to": 1}),
                       ("move_action", {"stage": 0, "action": 1, "to_stage": 1, "run_order": 1}),
                       ("move_action", {"stage": 0, "action": 0, "to_stage": 1, "run_order": 1}),
                       ("delete_action", {"stage": 0, "action": 0}), ("add_stage", {"index": 1, "name": "n"}),
                       ("duplicate_action", {"stage": 0, "action": 0})]:
        out = edit(COMMENTED, kind, **args)
        pipeline.parse(out)
        for name in ("a", "a2", "b") + (() if kind == "delete_action" else ("a1",)):
            assert _above(out, name) == f"# about {'stage ' if len(name) == 1 else ''}{name}", (kind, args, out)


def test_copies_and_deletes_leave_the_next_headers_comment_once_and_no_empty_arrays() -> None:
    text = COMMENTED + '\n# tell the team\n[[notify]]\non = ["failed"]\ncommand = "true"\n'
    for kind, args in [("duplicate_stage", {"stage": 1}), ("duplicate_action", {"stage": 1, "action": 0}),
                       ("delete_stage", {"stage": 1}), ("delete_action", {"stage": 1, "action": 0})]:
        out = edit(text, kind, **args)
        assert out.count("# tell the team") == 1 and "\n\n# tell the team\n[[notify]]" in out, (kind, out)
        assert "= []" not in out, (kind, out)
    out = edit(edit(edit(text, "delete_stage", stage=0), "delete_stage", stage=0), "add_stage", index=0, name="new")
    assert out.count("[[stage]]") == 1 and "\n\n[[stage]]" in out
    pipeline.parse(out)


def test_many_random_edits_keep_the_text_toml_and_every_comment() -> None:
    """200 edits drawn at random (fixed seed) that delete nothing: after each, the text is
    TOML, every comment line of the original is still there, and the stages and actions
    are the ones the edits made."""
    import random
    import tomllib

    rng = random.Random(9)
    text = ORIGINAL + '\n# tell the team\n[[notify]]\non = ["failed"]\ncommand = "true"\n'
    comments = {line.strip() for line in text.splitlines() if line.strip().startswith("#")}
    for step in range(200):
        stages = tomllib.loads(text)["stage"]
        s = rng.randrange(len(stages))
        count = len(stages[s].get("action", []))  # a stage can be left without actions: the validator says so
        a = rng.randrange(count) if count else 0
        ops = [("move_stage", {"stage": s, "to": rng.randrange(len(stages))}),
               ("add_stage", {"index": rng.randrange(len(stages) + 1), "name": "s"}),
               ("add_action", {"stage": s, "type": rng.choice(["run", "approval", "deploy"])})]
        if count:
            ops += [("move_action", {"stage": s, "action": a, "to_stage": rng.randrange(len(stages)),
                                     "run_order": rng.randint(1, 2)}),
                    ("rename_action", {"stage": s, "action": a, "name": f"n{step}"}),
                    ("set_key", {"stage": s, "action": a, "key": "retries", "value": rng.randint(0, 3)})]
            if len(text) < 6000:
                ops += [("duplicate_stage", {"stage": s}), ("duplicate_action", {"stage": s, "action": a})]
        kind, args = rng.choice(ops)
        before = sum(len(st.get("action", [])) for st in stages), len(stages)
        text = edit(text, kind, **args)
        after = tomllib.loads(text)
        grown = {"add_stage": (1, 1), "duplicate_stage": (count, 1), "add_action": (1, 0),
                 "duplicate_action": (1, 0)}.get(kind, (0, 0))
        assert (sum(len(st.get("action", [])) for st in after["stage"]), len(after["stage"])) == (
            before[0] + grown[0], before[1] + grown[1]), (step, kind, args)
        missing = [c for c in comments if c not in text]
        assert missing == [], (step, kind, args, missing)
        assert text.count("# tell the team\n[[notify]]") == 1, (step, kind, args)


def test_deleting_a_producer_drops_or_deletes_its_consumers() -> None:
    kept = edit(ORIGINAL, "delete_action", stage=0, action=0, consumers="keep")
    assert kept.count('inputs = ["wheel"]') == 2
    dropped = edit(ORIGINAL, "delete_action", stage=0, action=0, consumers="drop")
    assert "inputs" not in dropped
    pipeline.parse(dropped)
    deleted = edit(ORIGINAL, "delete_action", stage=0, action=0, consumers="delete")
    assert 'name = "unit"' not in deleted and 'name = "deploy"' not in deleted


def test_duplicates_get_free_names_and_the_result_validates() -> None:
    out = edit(ORIGINAL, "duplicate_action", stage=0, action=0)
    assert 'name = "wheel-copy"' in out and 'outputs = { wheel-copy = "dist/*.whl" }' in out
    out = edit(out, "duplicate_stage", stage=0)
    assert 'name = "build-copy"' in out and "wheel-copy-copy" in out
    pipeline.parse(out)
    assert "# needs the build package" in out


def test_form_values_are_written_as_by_hand() -> None:
    out = edit(ORIGINAL, "set_key", stage=0, action=1, key="env", value={"MODE": "fast"})
    out = edit(out, "set_key", stage=0, action=1, key="run", value="ruff check .\nruff format --check .")
    out = edit(out, "set_key", stage=0, action=1, key="when", value={"branches": ["main"]})
    assert 'env = { MODE = "fast" }' in out and 'when = { branches = ["main"] }' in out
    assert 'run = """\nruff check .\nruff format --check .\n"""' in out
    assert 'name = "lint"                      # fast, so it sits here' in out
    out = edit(out, "set_key", stage=0, action=1, key="when", value=None)
    assert "when" not in out
    pipeline.parse(out)


def test_an_edit_that_does_not_fit_the_text_is_one_clear_error() -> None:
    with pytest.raises(EditError, match="reload the text"):
        edit(ORIGINAL, "rename_action", stage=7, action=0, name="x")
    with pytest.raises(EditError, match="unknown edit"):
        edit(ORIGINAL, "explode")


def test_the_page_ships_in_the_package() -> None:
    """The static files are package data of gitpipe.editor (a wheel has them, not only a checkout)."""
    import tomllib

    project = tomllib.loads((DATA.parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "gitpipe.editor" in project["packages"]
    globs = project["package-data"]["gitpipe.editor"]
    static = DATA.parent.parent / "gitpipe" / "editor"
    shipped = {p.name for g in globs for p in static.glob(g)}
    assert shipped >= {"editor.html", "editor.css", *server.SCRIPT_PARTS}


def test_null_origins_and_rebinding_names_are_refused_even_with_the_token(editor: Editor) -> None:
    """A sandboxed iframe (Origin: null), a rebinding name that starts with 127.0.0.1, a name
    with a trailing dot and a Host without a port are refused even with the token."""
    body = {"text": ORIGINAL}
    for origin, host in (("null", None), (None, f"127.0.0.1.nip.io:{editor.port}"),
                         (None, f"localhost.:{editor.port}"), (None, "127.0.0.1")):
        status, text = request(editor, "/api/check", token=editor.token, origin=origin, host=host, body=body)
        assert status == 403, (origin, host, text)
    assert request(editor, f"/?token={editor.token}", host=f"127.0.0.1.nip.io:{editor.port}")[0] == 403
    status, text = request(editor, "/api/save", token=editor.token, origin="null", body={"text": "x", "force": True})
    assert status == 403 and editor.file.read_text() == ORIGINAL


def test_the_editors_check_of_a_text_nested_too_deeply_says_so_and_keeps_the_last_graph() -> None:
    """tomllib recurses per nested array: a text nested thousands deep is a problem of the text
    (as pipeline.parse says), not a RecursionError out of the editor's check."""
    from gitpipe.editor.check import check

    found = check("a = " + "[" * 5000 + "]" * 5000 + "\n", ".pipeline.toml")
    assert found["model"] is None
    assert [p["message"] for p in found["problems"]] == ["invalid TOML: nested too deeply"]
