"""`.pipeline.toml` text -> validated, frozen `Pipeline`; every problem reported at once.

The validator: it walks the file's tables and checks across actions (artifacts, names).
Beside it: gitpipe.tomllines finds the line of each key, gitpipe.tomlcheck collects problems
and reads typed values, gitpipe.actionspec validates one action table, gitpipe.triggers
validates [trigger], gitpipe.keys lists every key. What a parsed pipeline means at run time
(`when`, paths, placeholders, inputs) is gitpipe.matching's.

The git post-receive hook imports this module, so all of these import only the standard
library at module level. croniter (cron lines), importlib.metadata (plugin action types) and
difflib (suggestions) are imported inside the functions that need them, and only when a
pipeline has a schedule, a custom action type or a mistake.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import replace
from typing import Any

from gitpipe import keys, triggers
from gitpipe.actionspec import PipelineReport, action_specs, check_placeholders, env_pairs, labels
from gitpipe.errors import PipelineError, Problem
from gitpipe.models import ActionSpec, InputSpec, NotifySpec, Pipeline, StageSpec
from gitpipe.tomlcheck import ENV_NAME, Table, describe, suggest, syntax_problem
from gitpipe.tomllines import KeyPath, key_lines

EVENTS = keys.find("notify", "on").choices  # type: ignore[union-attr]
# The key lists come from gitpipe/keys.py, which also feeds `gitpipe schema` and the editor.
_TOP_KEYS = keys.names("top")
_PIPELINE_KEYS = keys.names("pipeline")
_INPUT_KEYS = keys.names("input")
_STAGE_KEYS = keys.names("stage")
_NOTIFY_KEYS = keys.names("notify")


def parse(text: str, *, file: str = ".pipeline.toml", default_name: str = "pipeline") -> Pipeline:
    """The validated `Pipeline` of a `.pipeline.toml` text; `PipelineError` lists every problem."""
    text = text.removeprefix("\ufeff")  # editors on Windows like to add one; tomllib rejects it
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError([syntax_problem(file, text, exc)]) from None
    except RecursionError:  # tomllib recurses per nested array or inline table: a pushed file can nest thousands
        raise PipelineError([Problem(file, 0, "invalid TOML: nested too deeply")]) from None
    report = PipelineReport(file, key_lines(text))
    pipeline = _pipeline(report, data, default_name)
    if report.problems:
        raise PipelineError(report.problems)
    return pipeline


PARSED_KEPT = 32  # pipelines `parsed` keeps
# Pipeline texts longer than this are never kept in memory from one push to the next (`parsed`,
# the heads-up's guesses, the intake's validated texts): a pusher's 4 MB files in every place of
# those caches would hold gigabytes in the daemon. A real .pipeline.toml is a few KiB.
KEPT_MAX_BYTES = 64 << 10


def parsed(text: str, default_name: str = "pipeline") -> Pipeline:
    """`parse`, shared for a text parsed before (a Pipeline is frozen): the daemon parses a push's
    pipeline at its heads-up and again as its run starts, on the way from push to exec (0.2-0.5
    ms each). An invalid text is parsed anew each time: errors are raised, not kept; so is one
    longer than KEPT_MAX_BYTES."""
    if len(text) > KEPT_MAX_BYTES:
        return parse(text, default_name=default_name)
    return _parsed(text, default_name)


@functools.lru_cache(maxsize=PARSED_KEPT)
def _parsed(text: str, default_name: str) -> Pipeline:
    return parse(text, default_name=default_name)


def _pipeline(report: PipelineReport, data: dict[str, Any], default_name: str) -> Pipeline:
    top = Table(report, data, (), "")
    for key in top.unknown_keys(_TOP_KEYS):
        noun = "table" if isinstance(data[key], (dict, list)) else "key"
        top.problem(f'unknown {noun} "{key}"{suggest(key, _TOP_KEYS)}', key)
    name, timeout, network, runs_on = default_name, None, None, None
    head = top.table("pipeline", "[pipeline]")
    if head is not None:
        head.check_keys(_PIPELINE_KEYS)
        name = head.name("name", "") or default_name
        timeout = head.duration("timeout", None, positive=True)
        network = head.get("network", (bool,), "true or false")
        runs_on = labels(head)
    pipeline = Pipeline(
        name=name,
        timeout=timeout,
        network=network,
        runs_on=runs_on or (),
        trigger=triggers.trigger_spec(top.table("trigger", "[trigger]")),
        env=env_pairs(top.table("env", "[env]")),
        stages=_stages(report, top),
        notify=tuple(_notify(report, item, i) for i, item in top.tables("notify", "[[notify]]")),
        inputs=_inputs(top.table("inputs", "[inputs]")),
    )
    _check_artifacts(report)
    return _expand_inputs(report, pipeline)


def _inputs(t: Table | None) -> tuple[InputSpec, ...]:
    """`[inputs.NAME]` tables: what `gitpipe run --var NAME=VALUE` may set."""
    if t is None:
        return ()
    specs: list[InputSpec] = []
    seen: dict[str, str] = {}
    for name, value in t.data.items():
        where = f'input "{name}"'
        if not ENV_NAME.fullmatch(name):
            t.problem(f'input name "{name}" may hold only letters, digits and "_" (it becomes '
                      f"$GITPIPE_INPUT_<NAME>)", name)
            continue
        if name.upper() in seen:
            t.problem(f'input "{name}" and input "{seen[name.upper()]}" would both be '
                      f"$GITPIPE_INPUT_{name.upper()}", name)
            continue
        seen[name.upper()] = name
        if not isinstance(value, dict):
            t.problem(f'{where} must be a table ([inputs.{name}] with default, description, options), '
                      f"not {describe(value)}", name)
            continue
        it = Table(t.report, value, t.path + (name,), f"[inputs.{name}]")
        it.check_keys(_INPUT_KEYS)
        default, options = it.string("default"), it.strings("options") or ()
        for key, text in (("default", default), *(("options", o) for o in options)):
            if text is not None and "\0" in text:  # it becomes $GITPIPE_INPUT_<NAME>: execve refuses it
                it.problem(f'"{key}" holds a NUL character (\\u0000), which no environment variable can hold', key)
        if "options" in value and not options and isinstance(value["options"], list):
            it.problem('"options" must list at least one value', "options")
        if default is not None and options and default not in options:
            it.problem(f'"default" "{default}" is not one of its options ({", ".join(options)})', "default")
        specs.append(InputSpec(name=name, line=t.report.line(t.path + (name,)), default=default,
                               description=it.string("description") or "", options=options))
    return tuple(specs)


def _notify(report: PipelineReport, data: dict[str, Any], index: int) -> NotifySpec:
    path: KeyPath = ("notify", index)
    t = Table(report, data, path, f"notify #{index + 1}")
    t.check_keys(_NOTIFY_KEYS)
    events = t.strings("on")
    choices = ", ".join(EVENTS)
    if events is None and "on" not in data:
        t.problem(f'missing required key "on" (a list of events: {choices})')
    elif events == ():
        t.problem(f'"on" must list at least one event ({choices})', "on")
    for k, event in enumerate(events or ()):
        if event not in EVENTS:
            t.problem(f'unknown event "{event}"{suggest(event, EVENTS)} (events: {choices})', "on", k)
    webhook, command = t.string("webhook"), t.string("command")
    if ("webhook" in data) == ("command" in data):
        t.problem('needs exactly one of "webhook" or "command"', "command")
    if webhook and not webhook.startswith(("http://", "https://")):
        t.problem(f'"webhook" must be an http:// or https:// URL, not "{webhook}"', "webhook")
    check_placeholders(t, "command", command)
    return NotifySpec(on=events or (), line=report.line(path), webhook=webhook, command=command)


def _label(noun: str, name: Any, index: int) -> str:
    return f'{noun} "{name}"' if isinstance(name, str) and name.strip() else f"{noun} #{index + 1}"


def _stages(report: PipelineReport, top: Table) -> tuple[StageSpec, ...]:
    if "stage" not in top.data or top.data["stage"] == []:  # `stage = []` has no stages either
        top.problem("no stages: add at least one [[stage]] with a [[stage.action]] under it", "stage")
        return ()
    stages: list[StageSpec] = []
    seen: dict[str, int] = {}
    for index, data in top.tables("stage", "[[stage]]"):
        stage = _stage(report, data, index)
        if stage.name in seen:
            report.add(
                ("stage", index, "name"),
                f'stage "{stage.name}": duplicate stage name (first at line {seen[stage.name]})',
            )
        elif stage.name:
            seen[stage.name] = stage.line
        stages.append(stage)
    return tuple(stages)


def _stage(report: PipelineReport, data: dict[str, Any], index: int) -> StageSpec:
    path: KeyPath = ("stage", index)
    label = _label("stage", data.get("name"), index)
    t = Table(report, data, path, label)
    t.check_keys(_STAGE_KEYS)
    name = t.name("name", "every stage needs a name") or ""
    if not data.get("action"):
        t.problem("no actions: add a [[stage.action]] under this [[stage]]")
    actions: list[ActionSpec] = []
    seen: dict[str, int] = {}
    for j, item in t.tables("action", "[[stage.action]]"):
        action_label = f"{label}, {_label('action', item.get('name'), j)}"
        for action in action_specs(report, item, path + ("action", j), action_label, index):
            if action.name in seen:
                report.add(
                    path + ("action", j, "name"),
                    f'{label}: duplicate action name "{action.name}" (first at line {seen[action.name]})',
                )
            elif action.name:
                seen[action.name] = action.line
            actions.append(action)
    return StageSpec(name=name, line=report.line(path), actions=tuple(actions))


def _expand_inputs(report: PipelineReport, pipe: Pipeline) -> Pipeline:
    """A consumer of a matrix action's artifact gets the artifacts of every copy."""
    if not report.matrix_outputs:
        return pipe

    def inputs(spec: ActionSpec) -> tuple[str, ...]:
        names = (report.matrix_outputs.get(n, (n,)) for n in spec.inputs)
        return tuple(dict.fromkeys(x for group in names for x in group))

    stages = tuple(replace(s, actions=tuple(replace(a, inputs=inputs(a)) for a in s.actions))
                   for s in pipe.stages)
    return replace(pipe, stages=stages)


def _check_artifacts(report: PipelineReport) -> None:
    """Artifact names are unique; every input is an output of an action that runs earlier."""
    producers: dict[str, tuple[int, int, str, KeyPath]] = {}  # artifact -> (stage, run_order, label, path)
    for stage, label, spec, path in report.actions:
        for name, _ in spec.outputs:
            if name in producers:
                first = producers[name][2]
                report.add(path + ("outputs", name), f'{label}: artifact "{name}" is already an output of {first}')
            else:
                producers[name] = (stage, spec.run_order, label, path)
    for group, copies in report.matrix_outputs.items():
        copy = producers.get(copies[0]) if copies else None
        if copy is None:
            continue
        if group in producers:
            report.add(copy[3] + ("outputs", group), f'{copy[2]}: artifact "{group}" (of every matrix copy) '
                       f"is already an output of {producers[group][2]}")
        else:
            producers[group] = copy  # `inputs = ["group"]` takes the artifacts of every copy
    for stage, label, spec, path in report.actions:
        for index, name in enumerate(spec.inputs):
            message = _input_problem(producers, name, stage, spec.run_order, path)
            if message:
                report.add(path + ("inputs", index), f'{label}: input "{name}" {message}')


def _input_problem(
    producers: dict[str, tuple[int, int, str, KeyPath]], name: str, stage: int, run_order: int, path: KeyPath
) -> str | None:
    if name not in producers:
        return f"is not an output of any action{suggest(name, producers)}"
    p_stage, p_order, p_label, p_path = producers[name]
    if (p_stage, p_order) < (stage, run_order):
        return None
    if p_path == path:
        return "is an output of this same action"
    if (p_stage, p_order) == (stage, run_order):
        return f"comes from {p_label}, which runs in parallel with this one (give this action a higher run_order)"
    return f"comes from {p_label}, which runs later (an input must come from an earlier stage or run_order)"
