"""A JSON Schema (draft 2020-12) of `.pipeline.toml`, made from the key definitions in keys.py.

Editors use it to complete and check the file (VS Code with Even Better TOML, taplo). It is
what the validator checks that a schema can say: key names, types, allowed values, required
keys, name and URL shapes. What it cannot say (inputs that come from an earlier action,
unique names, cron lines, a timeout longer than 0s) only `gitpipe validate` reports.
"""

from __future__ import annotations

from typing import Any

from gitpipe import keys

ID = "https://gitpipe.invalid/pipeline.schema.json"
ENV_NAME = "^[A-Za-z_][A-Za-z0-9_]*$"
ARTIFACT = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME = "^[^/\\\\\\u0000-\\u001f\\u007f]+$"
TARGET = "^(ssh://([^@/\\s]+@)?[^@/:\\s]+(:\\d+)?/\\S.*|file:///\\S.*)$"
DURATION = ("^\\s*(?=[^a-z]*\\d)(\\d+(\\.\\d+)?d)?\\s*(\\d+(\\.\\d+)?h)?\\s*(\\d+(\\.\\d+)?m)?\\s*"
            "(\\d+(\\.\\d+)?s)?\\s*$")
NOT_BLANK = "\\S"


def pipeline_schema(plugin_types: tuple[str, ...] = ()) -> dict[str, Any]:
    """The schema; `plugin_types`: the action types of the installed plugins."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": ID,
        "title": ".pipeline.toml",
        "description": "A gitpipe pipeline: stages of actions run on every push.",
        **_object("top", plugin_types),
        "$defs": {"action": _action(plugin_types)},
    }


def _object(table: str, plugin_types: tuple[str, ...]) -> dict[str, Any]:
    defs = keys.TABLES[table]
    out: dict[str, Any] = {
        "type": "object",
        "properties": {k.name: _value(k, plugin_types) for k in defs},
        "additionalProperties": False,
    }
    required = [k.name for k in defs if k.required]
    if required:
        out["required"] = required
    return out


def _value(key: keys.Key, plugin_types: tuple[str, ...]) -> dict[str, Any]:
    """The schema of one key's value, with its help as description."""
    if key.table == "action":
        value: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/action"}}
    elif key.kind == "tables":
        value = {"type": "array", "items": _object(key.table, plugin_types)}
        if key.table == "stage":
            value["minItems"] = 1
        if key.table == "notify":
            value["items"]["oneOf"] = [{"required": ["webhook"]}, {"required": ["command"]}]
    elif key.kind == "table":
        value = _object(key.table, plugin_types)
    elif key.kind == "schedule":
        value = {"type": "array", "items": {"oneOf": [_STRING, _object(key.table, plugin_types)]}}
    elif key.kind == "caches":
        value = {"type": "array", "items": _object(key.table, plugin_types)}
    elif key.kind == "named":
        value = {"type": "object", "propertyNames": {"pattern": ENV_NAME},
                 "additionalProperties": _object(key.table, plugin_types)}
    elif key.name == "type" and key.table == "" and key.choices == keys.ACTION_TYPES:
        value = {"type": "string", "enum": [*key.choices, *plugin_types]}
    else:
        value = dict(_KINDS[key.kind](key))
    value["description"] = key.help
    if key.default is not None:
        value["default"] = key.default
    return value


def _choice(key: keys.Key) -> dict[str, Any]:
    if key.name == "on":  # notify's events: an array of them
        return {"type": "array", "minItems": 1, "items": {"enum": list(key.choices)}}
    return {"type": "string", "enum": list(key.choices)}


_STRING = {"type": "string", "pattern": NOT_BLANK}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_KINDS: dict[str, Any] = {
    "string": lambda k: _STRING,
    "text": lambda k: _STRING,
    "name": lambda k: {"type": "string", "pattern": NAME, "not": {"enum": [".", ".."]}},
    "duration": lambda k: {"type": "string", "pattern": DURATION},
    "integer": lambda k: {"type": "integer", "minimum": k.minimum or 0},
    "boolean": lambda k: {"type": "boolean"},
    "strings": lambda k: _STRINGS,
    "cron": lambda k: _STRINGS,
    "inputs": lambda k: _STRINGS,
    "secrets": lambda k: {"type": "array", "items": {"type": "string", "pattern": ENV_NAME}},
    "choice": _choice,
    "env": lambda k: {
        "type": "object", "propertyNames": {"pattern": ENV_NAME},
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    },
    "outputs": lambda k: {
        "type": "object", "propertyNames": {"pattern": ARTIFACT},
        "additionalProperties": {"oneOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
        ]},
    },
    "matrix": lambda k: {
        "type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[A-Za-z0-9_]+$"},
        "additionalProperties": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    },
    "targets": lambda k: {"oneOf": [
        {"type": "string", "pattern": TARGET},
        {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": TARGET}},
    ]},
}


def _action(plugin_types: tuple[str, ...]) -> dict[str, Any]:
    """An action: every key described; which keys are allowed and required depends on `type`."""
    action: dict[str, Any] = {"type": "object", "properties": {k.name: _value(k, plugin_types) for k in keys.ACTION},
              "required": [k.name for k in keys.action_keys(None) if k.required]}
    rules = []
    for kind in keys.ACTION_TYPES:
        own = keys.action_keys(kind)
        then = {"propertyNames": {"enum": [k.name for k in own]},
                "required": [k.name for k in own if k.required]}
        is_kind: dict[str, Any] = {"properties": {"type": {"const": kind}}, "required": ["type"]}
        if kind == "run":  # no type = run
            is_kind = {"anyOf": [is_kind, {"not": {"required": ["type"]}}]}
        rules.append({"if": is_kind, "then": then})
    action["allOf"] = rules
    return action


def installed_schema() -> dict[str, Any]:
    """The schema with the action types of the plugins installed here."""
    from gitpipe.actionspec import plugin_types

    return pipeline_schema(tuple(sorted(plugin_types())))
