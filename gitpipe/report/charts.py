"""Geometry of the pages' inline SVG: duration bar charts, sparklines, the run graph.

Only numbers and labels here; the templates draw them (and escape every label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gitpipe.report import fmt

NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MIN_SLOTS = 20  # a chart of few runs keeps thin bars, left-aligned
STUB = 2.0  # height of a bar without a duration (queued, running, cancelled early)
AXIS_W = 40.0  # pixels: room for a duration label ("1.5m", "12h") at 11 px, right-aligned


@dataclass(frozen=True)
class Point:
    """One run on a chart."""

    seconds: float | None
    status: str
    title: str  # tooltip, e.g. "#42 succeeded in 1m 03s"
    href: str | None = None
    caption: str = ""  # x-axis label, e.g. "#42"


@dataclass(frozen=True)
class Bar:
    """A bar of a chart, in SVG user units."""

    x: float
    y: float
    w: float
    h: float
    status: str
    title: str
    href: str | None


@dataclass(frozen=True)
class Label:
    """A text on a chart."""

    x: float
    y: float
    text: str
    anchor: str = "middle"


@dataclass(frozen=True)
class Chart:
    """A bar chart or a sparkline."""

    width: float
    height: float
    bars: tuple[Bar, ...]
    grid: tuple[Label, ...] = ()  # horizontal lines with their value, at label.y
    captions: tuple[Label, ...] = ()
    axis: float = 0.0  # pixels left of the plot for the grid's labels (never on the bars)


def nice_step(top: float, ticks: int = 4) -> float:
    """The smallest round duration step with which `ticks` steps reach `top` seconds."""
    for step in NICE_STEPS:
        if step * ticks >= top:
            return float(step)
    return float(math.ceil(top / ticks / 86400) * 86400)


def bar_chart(points: list[Point], width: float = 1000, height: float = 150) -> Chart:
    """Bars of run durations, oldest left, under round-duration grid lines.

    The plot is stretched to the page's width (its viewBox is not kept in proportion),
    so captions are placed in percent of the width and labels in pixels of the height. The
    grid's labels stand in a gutter of their own left of the plot (AXIS_W pixels), beside
    their line: written over the plot they covered the first bar.
    """
    top, bottom = 16.0, height
    longest = max((p.seconds or 0.0 for p in points), default=0.0)
    step = nice_step(longest or 1.0)
    scale_top = step * max(1, math.ceil((longest or 1.0) / step))
    slot = width / max(len(points), MIN_SLOTS)
    bar_w = max(1.0, min(slot * 0.7, 40.0))
    bars = []
    for i, p in enumerate(points):
        h = max((bottom - top) * (p.seconds or 0.0) / scale_top, STUB)
        x = slot * i + (slot - bar_w) / 2
        bars.append(Bar(round(x, 1), round(bottom - h, 1), round(bar_w, 1), round(h, 1), p.status,
                        p.title, p.href))
    grid = tuple(Label(AXIS_W - 6, round(bottom - (bottom - top) * v / scale_top, 1), fmt.short_duration(v), "end")
                 for v in _ticks(step, scale_top))
    return Chart(width, height, tuple(bars), grid, _captions(points, slot / width * 100), AXIS_W)


def _ticks(step: float, top: float) -> list[float]:
    n = int(round(top / step))
    return [step * i for i in range(n + 1)]


def _captions(points: list[Point], slot_pct: float) -> tuple[Label, ...]:
    """Captions (x in percent) under the first and the last bar, and a few evenly between."""
    if not points:
        return ()
    every = max(1, math.ceil(len(points) / 6))
    picks = sorted({*range(0, len(points), every), len(points) - 1})
    if len(picks) > 1 and picks[-1] - picks[-2] < every / 2:
        picks.pop(-2)
    return tuple(Label(round(slot_pct * (i + 0.5), 2), 0.0, points[i].caption) for i in picks)


def sparkline(points: list[Point], slots: int = 30, width: float = 150, height: float = 32) -> Chart:
    """A small trend: one thin bar per run, newest right, a shared scale."""
    points = points[-slots:]
    slot = width / slots
    longest = max((p.seconds or 0.0 for p in points), default=0.0) or 1.0
    offset = slots - len(points)
    bars = []
    for i, p in enumerate(points):
        h = max(STUB, (height - 2) * (p.seconds or 0.0) / longest)
        bars.append(Bar(round(slot * (offset + i) + 0.5, 1), round(height - h, 1), round(slot - 1.5, 1),
                        round(h, 1), p.status, p.title, p.href))
    return Chart(width, height, tuple(bars))


# --------------------------------------------------------------------------- the run graph

BOX_W, BOX_H = 180.0, 48.0
GAP_Y, GROUP_GAP, STAGE_GAP = 14.0, 36.0, 52.0
HEAD, PAD = 40.0, 12.0
CHAR_W = 7.6  # average width of a character of the box title font
FRAME_HEAD, FRAME_PAD = 24.0, 6.0  # a matrix group's frame: room for its name above the copies, margin
FRAME_CHAR_W = 6.6  # the frame label's smaller font


@dataclass(frozen=True)
class GraphAction:
    """An action as the run graph shows it."""

    id: int
    name: str
    status: str
    detail: str  # "1m 03s · 2 attempts"
    href: str
    group: str | None = None  # the matrix action it is a copy of: boxed with its siblings
    state: str = ""  # the status in words, when the box's status is a display one ("failed, allowed")


@dataclass(frozen=True)
class GraphStage:
    """A stage of the run graph, its actions grouped by run_order."""

    name: str
    status: str
    groups: tuple[tuple[GraphAction, ...], ...]  # by run_order, lowest first


@dataclass(frozen=True)
class Node:
    """A placed action box."""

    action: GraphAction
    x: float
    y: float
    label: str  # the name, cut to fit


@dataclass(frozen=True)
class Frame:
    """A box around the copies of one matrix action, with its name as written above them."""

    x: float
    y: float
    width: float
    height: float
    label: str
    title: str
    count: int


@dataclass(frozen=True)
class Column:
    """A placed stage heading."""

    x: float
    width: float
    name: str
    status: str
    label: str


@dataclass(frozen=True)
class Graph:
    """The laid-out run graph."""

    width: float
    height: float
    columns: tuple[Column, ...]
    nodes: tuple[Node, ...]
    edges: tuple[str, ...]  # SVG path data
    frames: tuple[Frame, ...] = ()
    box_w: float = BOX_W
    box_h: float = BOX_H


def fit(text: str, room: float, char_w: float = CHAR_W) -> str:
    """Cut a label to the characters that fit in `room` pixels, with an ellipsis."""
    most = max(1, int(room / char_w))
    return text if len(text) <= most else text[:most - 1] + "…"


def pipeline_graph(stages: list[GraphStage]) -> Graph:
    """Stages as columns, run_order groups as sub-columns, actions as boxes, curves between."""
    columns: list[Column] = []
    lanes: list[list[Node]] = []
    ports: list[list[tuple[float, float, float]]] = []  # per lane: (left x, right x, y) edges meet
    frames: list[Frame] = []
    bottom = HEAD
    x = PAD
    for stage in stages:
        start = x
        for group in stage.groups or ((),):
            lane, lane_frames, end = _lane(group, x)
            lanes.append(lane)
            frames += lane_frames
            ports.append(_ports(lane, lane_frames))
            bottom = max(bottom, end)
            x += BOX_W + GROUP_GAP
        x -= GROUP_GAP
        columns.append(Column(start, x - start, stage.name, stage.status, fit(stage.name, x - start - 24)))
        x += STAGE_GAP
    height = max(bottom, HEAD + BOX_H) + PAD
    width = max(x - STAGE_GAP + PAD, 2 * PAD)
    edges = tuple(e for a, b in zip(ports, ports[1:]) for e in _curves(a, b))
    return Graph(width, height, tuple(columns), tuple(n for lane in lanes for n in lane), edges, tuple(frames))


def _ports(lane: list[Node], frames: list[Frame]) -> list[tuple[float, float, float]]:
    """Where edges meet a lane: each box, but a matrix group once, at its frame."""
    out = [(n.x, n.x + BOX_W, n.y + BOX_H / 2) for n in lane if not n.action.group]
    out += [(f.x, f.x + f.width, f.y + f.height / 2) for f in frames]
    return sorted(out, key=lambda p: p[2])


def _lane(group: tuple[GraphAction, ...], x: float) -> tuple[list[Node], list[Frame], float]:
    """One run_order group's boxes top to bottom; the copies of a matrix action framed together
    under its name. Returns the nodes, the frames and the lane's bottom edge."""
    nodes: list[Node] = []
    frames: list[Frame] = []
    y = HEAD
    i = 0
    while i < len(group):
        a = group[i]
        copies = [a]
        while a.group and i + len(copies) < len(group) and group[i + len(copies)].group == a.group:
            copies.append(group[i + len(copies)])
        if a.group:
            top = y
            y += FRAME_HEAD
        for c in copies:
            nodes.append(Node(c, x, y, fit(c.name, BOX_W - 46)))
            y += BOX_H + GAP_Y
        if a.group:
            y += FRAME_PAD - GAP_Y
            label = fit(a.group.replace("{matrix.", "{"), BOX_W - 40, FRAME_CHAR_W)
            frames.append(Frame(x - FRAME_PAD, top, BOX_W + 2 * FRAME_PAD, y - top, label,
                                f"matrix {a.group}: {len(copies)} copies", len(copies)))
            y += GAP_Y
        i += len(copies)
    return nodes, frames, y - GAP_Y


def _curves(left: list[tuple[float, float, float]], right: list[tuple[float, float, float]]) -> list[str]:
    """A curve from every box (or matrix frame) of one lane to every one of the next."""
    out = []
    for _, x1, y1 in left:
        for x2, _, y2 in right:
            mid = (x1 + x2) / 2
            out.append(f"M{x1:g} {y1:g}C{mid:g} {y1:g} {mid:g} {y2:g} {x2:g} {y2:g}")
    return out
