"""What the page shows for a text: the validator's problems (each pinned to its line and to
the stage or action it is in), the stages and actions, and the graph laid out as the report
draws a run.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from typing import Any

from gitpipe import pipeline, tomllines
from gitpipe.errors import PipelineError, Problem
from gitpipe.report import charts

Node = tuple[int, ...]  # (stage,) or (stage, action)


def check(text: str, file: str) -> dict[str, Any]:
    """{"problems": [...], "model": {...} or None when the text is not TOML (keep the last graph)}."""
    try:
        pipeline.parse(text, file=file)
        problems: list[Problem] = []
    except PipelineError as exc:
        problems = exc.problems
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except (tomllib.TOMLDecodeError, RecursionError):  # nested too deeply: see pipeline.parse
        return {"problems": [_problem(p, None) for p in problems], "model": None}
    lines = tomllines.key_lines(text)
    stages = _stages(data, lines)
    owner = _owners(lines)
    out = [_problem(p, owner(p.line)) for p in problems]
    return {"problems": out, "model": {"stages": stages, "graph": _graph(stages, out)}}


def _problem(p: Problem, node: Node | None) -> dict[str, Any]:
    return {"line": p.line, "message": p.message, "text": str(p), "node": list(node) if node else None}


def _owners(lines: dict[tomllines.KeyPath, int]) -> Any:
    """A function: line -> the stage or action whose part of the file holds it."""
    starts: list[tuple[int, Node | None]] = []
    for path, line in lines.items():
        if len(path) == 2 and path[0] == "stage":
            starts.append((line, (int(path[1]),)))
        elif len(path) == 4 and path[0] == "stage" and path[2] == "action":
            starts.append((line, (int(path[1]), int(path[3]))))
        elif path[0] != "stage" and len(path) <= 2:
            starts.append((line, None))
    starts.sort(key=lambda s: s[0])

    def owner(line: int) -> Node | None:
        found: Node | None = None
        for start, node in starts:
            if start > line:
                break
            found = node
        return found

    return owner


def _plain(value: Any) -> Any:
    """A TOML value as JSON (dates as their text)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return value


def _stages(data: dict[str, Any], lines: dict[tomllines.KeyPath, int]) -> list[dict[str, Any]]:
    raw = data.get("stage")
    out = []
    for i, stage in enumerate(raw if isinstance(raw, list) else []):
        stage = stage if isinstance(stage, dict) else {}
        actions = stage.get("action")
        items = []
        for j, action in enumerate(actions if isinstance(actions, list) else []):
            action = action if isinstance(action, dict) else {}
            order = action.get("run_order", 1)
            outputs = action.get("outputs")
            inputs = action.get("inputs")
            items.append({
                "name": str(action.get("name", "")),
                "type": str(action.get("type", "run")),
                "run_order": order if isinstance(order, int) and not isinstance(order, bool) and order > 0 else 1,
                "inputs": [x for x in inputs if isinstance(x, str)] if isinstance(inputs, list) else [],
                "outputs": list(outputs) if isinstance(outputs, dict) else [],
                "line": lines.get(("stage", i, "action", j), 0),
                "values": _plain(action),
            })
        out.append({"name": str(stage.get("name", "")), "line": lines.get(("stage", i), 0), "actions": items})
    return out


def _detail(action: dict[str, Any]) -> str:
    values = action["values"]
    if action["type"] == "deploy":
        return f"deploy to {values.get('environment', '?')}"
    if action["type"] == "approval":
        return "approval"
    if action["type"] != "run":
        return action["type"]
    script = values.get("run")
    first = script.strip().splitlines()[0] if isinstance(script, str) and script.strip() else "no script"
    return charts.fit(first, charts.BOX_W - 46, 6.4)


def _graph(stages: list[dict[str, Any]], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """Positions from the report's run-graph layout; edges from each producer to its consumers."""
    bad = {tuple(p["node"]) for p in problems if p["node"]}
    graph_stages = []
    for i, s in enumerate(stages):
        orders = sorted({a["run_order"] for a in s["actions"]})
        groups = tuple(
            tuple(charts.GraphAction(j, a["name"], "failed" if (i, j) in bad else "pending", _detail(a), "")
                  for j, a in enumerate(s["actions"]) if a["run_order"] == order)
            for order in orders)
        graph_stages.append(charts.GraphStage(s["name"], "failed" if (i,) in bad else "pending", groups))
    g = charts.pipeline_graph(graph_stages)
    nodes, lanes = [], []
    node_stage = _node_stages(g, stages)
    for node, (i, order) in zip(g.nodes, node_stage):
        nodes.append({"stage": i, "action": node.action.id, "x": node.x, "y": node.y, "label": node.label,
                      "detail": node.action.detail, "bad": node.action.status == "failed", "run_order": order})
    for i, (column, s) in enumerate(zip(g.columns, stages)):
        orders = sorted({a["run_order"] for a in s["actions"]}) or [1]
        for k, order in enumerate(orders):
            lanes.append({"stage": i, "run_order": order, "x": column.x + k * (g.box_w + charts.GROUP_GAP)})
    columns = [{"x": c.x, "width": c.width, "label": c.label, "name": s["name"], "bad": c.status == "failed"}
               for c, s in zip(g.columns, stages)]
    return {"width": g.width + g.box_w / 2, "height": g.height + g.box_h, "box_w": g.box_w,
            "box_h": g.box_h, "head": charts.HEAD, "columns": columns, "nodes": nodes, "lanes": lanes,
            "edges": _edges(stages, nodes, g.box_w, g.box_h, g.height - charts.PAD + 6)}


def _node_stages(g: charts.Graph, stages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(stage index, run_order) of each placed node, in the layout's order."""
    out: list[tuple[int, int]] = []
    for i, s in enumerate(stages):
        for order in sorted({a["run_order"] for a in s["actions"]}):
            out.extend((i, order) for a in s["actions"] if a["run_order"] == order)
    return out


def _edges(stages: list[dict[str, Any]], nodes: list[dict[str, Any]], w: float, h: float,
           below: float) -> list[dict[str, Any]]:
    """A curve from each producer to each consumer; one that would cross the boxes of a lane
    between them goes round under every box instead."""
    at = {(n["stage"], n["action"]): n for n in nodes}
    producer: dict[str, tuple[int, int]] = {}
    for i, s in enumerate(stages):
        for j, a in enumerate(s["actions"]):
            for name in a["outputs"]:
                producer.setdefault(name, (i, j))
    edges = []
    for i, s in enumerate(stages):
        for j, a in enumerate(s["actions"]):
            for name in a["inputs"]:
                if name not in producer or producer[name] not in at:
                    continue
                src, dst = at[producer[name]], at[(i, j)]
                x1, y1, x2, y2 = src["x"] + w, src["y"] + h / 2, dst["x"], dst["y"] + h / 2
                if x2 - x1 > charts.STAGE_GAP + 1:
                    d = (f"M{x1:g} {y1:g}C{x1 + 18:g} {y1:g} {x1 + 18:g} {below:g} {x1 + 36:g} {below:g}"
                         f"L{x2 - 36:g} {below:g}C{x2 - 18:g} {below:g} {x2 - 18:g} {y2:g} {x2:g} {y2:g}")
                else:
                    mid = (x1 + x2) / 2
                    d = f"M{x1:g} {y1:g}C{mid:g} {y1:g} {mid:g} {y2:g} {x2:g} {y2:g}"
                edges.append({"artifact": name, "from": list(producer[name]), "to": [i, j], "d": d,
                              "backwards": x2 <= x1})
    return edges
