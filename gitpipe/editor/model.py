"""The editor's edits of a `.pipeline.toml` text, made with tomlkit so that everything the edit
does not touch (comments, key order, blank lines, quoting) stays as the user wrote it.

Each edit is one `Op` (what the page sends) applied to a text, giving a new text. Stages and
actions are addressed by their index in the file, as `describe` numbers them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, InlineTable, SingleKey, StringType, Table, Whitespace

from gitpipe.errors import EditError

# Keys whose text may read $GITPIPE_OUT_<ACTION>_<KEY>: renaming the action renames them.
_SCRIPT_KEYS = ("run", "before_switch", "after_switch", "healthcheck", "message")


@dataclass(frozen=True)
class Op:
    """One edit: `kind` and its arguments (stage/action indexes, names, a key and value)."""

    kind: str
    args: dict[str, Any]


def apply(text: str, op: Op) -> str:
    """The text after `op`; EditError if the op does not fit the text."""
    handler = _OPS.get(op.kind)
    if handler is None:
        raise EditError(f'unknown edit "{op.kind}"')
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise EditError(f"fix the TOML first: {exc}") from None
    try:
        handler(doc, **op.args)
    except (KeyError, IndexError, TypeError, ValueError, TOMLKitError) as exc:
        raise EditError(f'cannot "{op.kind}" here ({exc}): reload the text') from None
    out = tomlkit.dumps(doc)
    if text.endswith("\n") and not text.endswith("\n\n"):
        out = out.rstrip("\n") + "\n"  # a table added at the end brings no blank line after it
    return out


def env_key(action: str) -> str:
    """The part of GITPIPE_OUT_<ACTION>_<KEY> that names an action."""
    return re.sub(r"[^A-Za-z0-9]", "_", action).upper()


# --------------------------------------------------------------------------- helpers


def _stages(doc: Any) -> AoT:
    return Tables(doc, "stage").aot


def _actions(doc: Any, stage: int) -> AoT:
    return Tables(_stages(doc)[stage], "action").aot


def _every_action(doc: Any) -> list[Table]:
    return [a for s in doc.get("stage", []) for a in s.get("action", [])]


def _indent_of(aot: AoT, default: str) -> str:
    for table in aot:
        return str(table.trivia.indent)
    return default


def _new_table(values: dict[str, Any], indent: str) -> Table:
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, _item(value))
    table.trivia.indent = indent
    for _, item in table.value.body:
        if item is not None and not isinstance(item, Whitespace):
            item.trivia.indent = indent
    return table


def _item(value: Any) -> Any:
    """A JSON value from the page as a TOML item; tables inline, as one would write them by hand."""
    if isinstance(value, dict):  # { a = "x", b = ["y"] }, spaced as people write it
        pairs = ", ".join(f"{tomlkit.key(k).as_string()} = {_item(v).as_string()}" for k, v in value.items())
        return tomlkit.parse(f"x = {{ {pairs} }}\n" if pairs else "x = {}\n")["x"]
    if isinstance(value, list):
        array = tomlkit.array()
        array.extend(_item(v) for v in value)
        return array
    if isinstance(value, str) and "\n" in value:
        return _multiline(value)
    return tomlkit.item(value)


def _last(table: Table) -> Table:
    """The table whose lines end `table`: a [[stage]] ends where its last [[stage.action]] ends."""
    while table.value.body and isinstance(table.value.body[-1][1], AoT) and len(table.value.body[-1][1]):
        table = table.value.body[-1][1][-1]
    return table


# Comment lines right above a table's header belong to that table, but tomlkit keeps them at
# the end of whatever comes before it (the previous table, or the parent's keys). A `Where`
# is that place: a container and the index in its body where those comment lines end. Moving,
# inserting and deleting tables take them along or leave them above the header they describe.
# Container.body and ._map are tomlkit internals (pinned to a version range in pyproject).
Where = tuple[Container, int]


@dataclass(frozen=True)
class Tables:
    """An array of tables with what holds it: the document or a [[stage]], and its key."""

    parent: Any
    key: str

    @property
    def aot(self) -> AoT:
        if self.key not in self.parent:
            body = self.parent.body if isinstance(self.parent, Container) else self.parent.value.body
            last = body[-1][1] if body else None
            if isinstance(last, (Table, AoT)) and _end(last):
                table = last[-1] if isinstance(last, AoT) else last
                if not isinstance(_last(table).value.body[-1][1], Whitespace):
                    _last(table).add(tomlkit.nl())
            elif last is not None and not isinstance(last, Whitespace):
                self.parent.add(tomlkit.nl())
            self.parent.append(self.key, tomlkit.aot())
        return self.parent[self.key]


def _end(item: Any) -> Where | None:
    if isinstance(item, AoT):
        if not len(item):
            return None
        item = item[-1]
    if not isinstance(item, Table):
        return None
    table = _last(item)
    return table.value, len(table.value.body)


def _slot(tables: Tables, index: int) -> Where:
    """Where the comment lines above the header of table `index` end (index = len: above
    whatever follows the array in the file)."""
    if index > 0:
        return _end(tables.aot[index - 1])  # type: ignore[return-value]
    body = tables.parent if isinstance(tables.parent, Container) else tables.parent.value
    at = body._map[SingleKey(tables.key)]
    at = min(at) if isinstance(at, tuple) else at
    before = _end(body.body[at - 1][1]) if at > 0 else None
    return before or (body, at)


def _shift(container: Container, start: int, delta: int) -> None:
    for key, at in container._map.items():
        if isinstance(at, tuple):
            container._map[key] = tuple(a + delta if a >= start else a for a in at)
        elif at >= start:
            container._map[key] = at + delta


def _take_comments(where: Where) -> list[Any]:
    container, end = where
    body, start = container.body, end
    while start > 0 and body[start - 1][0] is None and isinstance(body[start - 1][1], Comment):
        start -= 1
    taken = [item for _, item in body[start:end]]
    del body[start:end]
    _shift(container, end, start - end)
    return taken


def _put_comments(where: Where, comments: list[Any]) -> None:
    container, at = where
    container.body[at:at] = [(None, c) for c in comments]
    _shift(container, at, len(comments))


def _blank_line_after(aot: AoT, index: int) -> None:
    """A blank line at the end of table `index`, so a table added after it stands apart."""
    if not 0 <= index < len(aot):
        return
    body = _last(aot[index]).value.body
    if not body or not (isinstance(body[-1][1], Whitespace) and "\n" in body[-1][1].s):
        _last(aot[index]).add(tomlkit.nl())


def _insert(tables: Tables, index: int, table: Table, comments: list[Any] | None = None) -> None:
    """Insert a table, a blank line before and after it and `comments` right above it; the
    comment lines above the table it pushes down stay above that one."""
    aot = tables.aot
    index = min(index, len(aot))
    displaced = _take_comments(_slot(tables, index))
    _blank_line_after(aot, index - 1)
    if comments:
        _put_comments(_slot(tables, index), comments)
    if index >= len(aot):
        aot.append(table)
    else:
        aot.insert(index, table)
    _blank_line_after(aot, index)
    _put_comments(_slot(tables, index + 1), displaced)


def _remove(tables: Tables, index: int) -> tuple[Table, list[Any]]:
    """Take table `index` out with the comment lines above it; the ones above the next
    header stay above it."""
    aot = tables.aot
    own = _take_comments(_slot(tables, index))
    following = _take_comments(_slot(tables, index + 1))
    table = aot[index]
    del aot[index]
    _put_comments(_slot(tables, index), following)
    if not len(aot):  # no `action = []` left behind
        del tables.parent[tables.key]
    return table, own


def _move(source: Tables, index: int, target: Tables, to: int) -> None:
    table, comments = _remove(source, index)
    _insert(target, to, table, comments)


def _stage_list(doc: Any) -> Tables:
    return Tables(doc, "stage")


def _action_list(doc: Any, stage: int) -> Tables:
    return Tables(_stages(doc)[stage], "action")


def _copy(table: Table) -> Table:
    return copy.deepcopy(table)


def _free_name(taken: set[str], base: str) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _artifacts(doc: Any) -> set[str]:
    return {name for a in _every_action(doc) for name in a.get("outputs", {})}


# --------------------------------------------------------------------------- stages


def add_stage(doc: Any, index: int, name: str) -> None:
    """A new stage at `index`, with one action so that the pipeline stays valid."""
    stages = _stages(doc)
    names = {str(s.get("name", "")) for s in stages}
    stage = _new_table({"name": _free_name(names, name)}, _indent_of(stages, ""))
    inner = _indent_of(stages[0]["action"], "  ") if len(stages) and "action" in stages[0] else "  "
    stage.add(tomlkit.nl())
    stage.append("action", tomlkit.aot())
    stage["action"].append(_new_table({"name": "step", "run": 'echo "hello from gitpipe"'}, inner))
    _insert(_stage_list(doc), index, stage)


def rename_stage(doc: Any, stage: int, name: str) -> None:
    _stages(doc)[stage]["name"] = name


def delete_stage(doc: Any, stage: int) -> None:
    _remove(_stage_list(doc), stage)


def duplicate_stage(doc: Any, stage: int) -> None:
    stages = _stages(doc)
    copy = _copy(stages[stage])
    _take_comments(_end(copy) or (copy.value, 0))  # the ones at its end are above the next header
    copy["name"] = _free_name({str(s.get("name", "")) for s in stages}, f"{copy.get('name', 'stage')}-copy")
    taken = _artifacts(doc)
    for action in copy.get("action", []):
        _rename_copied_outputs(action, taken)
    _insert(_stage_list(doc), stage + 1, copy)


def move_stage(doc: Any, stage: int, to: int) -> None:
    _move(_stage_list(doc), stage, _stage_list(doc), to)


# --------------------------------------------------------------------------- actions


def add_action(doc: Any, stage: int, type: str = "run", run_order: int = 1, name: str = "") -> None:
    actions = _actions(doc, stage)
    taken = {str(a.get("name", "")) for a in actions}
    values: dict[str, Any] = {"name": _free_name(taken, name or type)}
    if type != "run":
        values["type"] = type
    if run_order > 1:
        values["run_order"] = run_order
    if type == "run":
        values["run"] = 'echo "hello from gitpipe"'
    elif type == "approval":
        values["message"] = "Go on with {short_sha}?"
    elif type == "deploy":
        values.update(environment="staging", target="file:///srv/app")
    _insert(_action_list(doc, stage), len(actions), _new_table(values, _indent_of(actions, "  ")))


def rename_action(doc: Any, stage: int, action: int, name: str) -> None:
    """Rename an action; its outputs named after it and every GITPIPE_OUT_ reference follow."""
    table = _actions(doc, stage)[action]
    old = str(table.get("name", ""))
    table["name"] = name
    if old and old in table.get("outputs", {}):
        rename_output(doc, stage, action, old, name)
    if old and env_key(old) != env_key(name):
        pattern = re.compile(rf"GITPIPE_OUT_{re.escape(env_key(old))}_")
        for other in _every_action(doc):
            for key in _SCRIPT_KEYS:
                value = other.get(key)
                if isinstance(value, str) and pattern.search(value):
                    _set_string(other, key, pattern.sub(f"GITPIPE_OUT_{env_key(name)}_", value))
            for key, value in list(other.get("env", {}).items()):
                if isinstance(value, str) and pattern.search(value):
                    other["env"][key] = pattern.sub(f"GITPIPE_OUT_{env_key(name)}_", value)


def _set_string(table: Table, key: str, value: str) -> None:
    """Replace a string keeping its kind: a multi-line script stays one, a literal stays literal."""
    old = table[key]
    kind = getattr(old, "type", None)
    if kind in (StringType.MLB, StringType.MLL) or "\n" in value:
        table[key] = _multiline(value)
    else:
        table[key] = tomlkit.string(value, literal=kind == StringType.SLL and "'" not in value)


def _multiline(value: str) -> Any:
    """A multi-line basic string written as by hand: the text starts on the line after \"\"\"."""
    value = value if value.endswith("\n") else value + "\n"  # the closing quotes on a line of their own
    body = value.replace("\\", "\\\\").replace('"""', '""\\"')
    body = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", body)
    return tomlkit.parse(f'x = """\n{body}"""\n')["x"]


def rename_output(doc: Any, stage: int, action: int, old: str, new: str) -> None:
    """Rename an artifact; the `inputs` that take it follow."""
    outputs = _actions(doc, stage)[action]["outputs"]
    outputs.value._replace(old, new, outputs.value.item(old))  # in place: the order and spacing stay
    for other in _every_action(doc):
        inputs = other.get("inputs")
        if inputs is not None:
            for i, name in enumerate(inputs):
                if name == old:
                    inputs[i] = new


def duplicate_action(doc: Any, stage: int, action: int) -> None:
    actions = _actions(doc, stage)
    copy = _copy(actions[action])
    _take_comments(_end(copy) or (copy.value, 0))  # the ones at its end are above the next header
    copy["name"] = _free_name({str(a.get("name", "")) for a in actions}, f"{copy.get('name', 'action')}-copy")
    _rename_copied_outputs(copy, _artifacts(doc))
    _insert(_action_list(doc, stage), action + 1, copy)


def _rename_copied_outputs(action: Table, taken: set[str]) -> None:
    for name in list(action.get("outputs", {})):
        new = _free_name(taken, f"{name}-copy")
        taken.add(new)
        outputs = action["outputs"]
        outputs.value._replace(name, new, outputs.value.item(name))


def delete_action(doc: Any, stage: int, action: int, consumers: str = "keep") -> None:
    """Delete an action. Its consumers: "keep" them as they are (the validator will say what
    is missing), "drop" the inputs that came from it, or "delete" them too."""
    outputs = set(_actions(doc, stage)[action].get("outputs", {}))
    _remove(_action_list(doc, stage), action)
    if consumers == "keep" or not outputs:
        return
    for s, stage_table in enumerate(doc.get("stage", [])):
        aot = stage_table.get("action", [])
        for index in reversed(range(len(aot))):
            inputs = aot[index].get("inputs")
            if inputs is None or not outputs & {str(i) for i in inputs}:
                continue
            if consumers == "delete":
                _remove(_action_list(doc, s), index)
            else:
                for i in reversed(range(len(inputs))):
                    if inputs[i] in outputs:
                        del inputs[i]
                if not len(inputs):
                    del aot[index]["inputs"]


def move_action(doc: Any, stage: int, action: int, to_stage: int, run_order: int) -> None:
    """Move an action to the end of another stage (or the same) into run_order group `run_order`."""
    table = _actions(doc, stage)[action]
    if run_order <= 1 and "run_order" in table:
        del table["run_order"]
    elif run_order > 1:
        table["run_order"] = run_order
    if to_stage == stage:
        return
    _move(_action_list(doc, stage), action, _action_list(doc, to_stage), len(_actions(doc, to_stage)))


def set_key(doc: Any, stage: int, action: int, key: str, value: Any) -> None:
    """Set one key of an action (None removes it), as the form edits it."""
    table = _actions(doc, stage)[action]
    if value is None or value == "" or value == [] or value == {}:
        if key in table:
            del table[key]
        return
    if key in table and isinstance(table[key], (Table, InlineTable)) and isinstance(value, dict):
        current = table[key]
        for old in [k for k in current if k not in value]:
            del current[old]
        for k, v in value.items():
            if current.get(k) != v:
                current[k] = _item(v)
        return
    if key in table and table[key] == value:
        return
    if isinstance(value, str) and key in table and isinstance(table[key], str):
        _set_string(table, key, value)
        return
    table[key] = _item(value)


_OPS: dict[str, Callable[..., None]] = {
    "add_stage": add_stage, "rename_stage": rename_stage, "delete_stage": delete_stage,
    "duplicate_stage": duplicate_stage, "move_stage": move_stage, "add_action": add_action,
    "rename_action": rename_action, "rename_output": rename_output, "duplicate_action": duplicate_action,
    "delete_action": delete_action, "move_action": move_action, "set_key": set_key,
}


