/* gitpipe edit: the graph (the report's run-graph layout), dragging, and the commands on
   stages and actions. */

/* ------------------------------------------------------------------ the graph */

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function place(e, x, y, w, h) {
  e.style.left = x + "px"; e.style.top = y + "px";
  if (w !== undefined) e.style.width = w + "px";
  if (h !== undefined) e.style.height = h + "px";
}

function drawGraph() {
  graphEl.textContent = "";
  if (!S.model || !S.model.stages.length) { drawEmpty(); return; }
  var g = S.model.graph, box = el("div", "graph");
  place(box, 0, 0, g.width, g.height);
  box.style.position = "relative";
  var svgNS = "http://www.w3.org/2000/svg", svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "edges");
  svg.setAttribute("width", g.width); svg.setAttribute("height", g.height);
  svg.setAttribute("aria-hidden", "true");
  g.edges.forEach(function (e) {
    var path = document.createElementNS(svgNS, "path");
    path.setAttribute("d", e.d);
    path.setAttribute("class", "edge" + (e.backwards ? " backwards" : ""));
    path.dataset.artifact = e.artifact;
    var t = document.createElementNS(svgNS, "title");
    t.textContent = "artifact " + e.artifact;
    path.appendChild(t);
    svg.appendChild(path);
  });
  box.appendChild(svg);
  var bottom = g.height - g.box_h;
  g.columns.forEach(function (c, i) {
    var head = el("button", "stage-head", c.label || "(no name)");
    head.type = "button";
    head.dataset.stage = String(i);
    head.draggable = true;
    head.title = "stage " + c.name + " (Enter: edit; Alt+Left/Right: move; drag to reorder)";
    if (badAt([i]).length) head.classList.add("bad");
    if (S.selected && S.selected.length === 1 && S.selected[0] === i) head.classList.add("selected");
    place(head, c.x - 4, 6, c.width + 8);
    stageEvents(head, i);
    box.appendChild(head);
    var newlane = el("div", "newlane");
    newlane.dataset.stage = String(i);
    newlane.title = "drop here: a new run_order group after the others";
    place(newlane, c.x + c.width + 6, g.head - 4, 26, bottom - g.head + 8);
    var orders = S.model.stages[i].actions.map(function (a) { return a.run_order; });
    dropZone(newlane, i, function () { return Math.max.apply(null, orders.concat([0])) + 1; });
    box.appendChild(newlane);
    var add = el("button", "add-action", "+ action");
    add.type = "button";
    add.title = "add an action to stage " + c.name;
    add.addEventListener("click", function () { addAction(i); });
    place(add, c.x, bottom + 14);
    box.appendChild(add);
  });
  g.lanes.forEach(function (l) {
    var lane = el("div", "lane");
    lane.dataset.stage = String(l.stage);
    lane.dataset.order = String(l.run_order);
    place(lane, l.x - 6, g.head - 4, g.box_w + 12, bottom - g.head + 8);
    dropZone(lane, l.stage, function () { return l.run_order; });
    box.appendChild(lane);
  });
  g.nodes.forEach(function (n) {
    var a = S.model.stages[n.stage].actions[n.action];
    var node = el("button", "node");
    node.type = "button";
    node.draggable = true;
    node.dataset.stage = String(n.stage);
    node.dataset.action = String(n.action);
    node.dataset.name = a.name;
    node.appendChild(el("span", "name", n.label || "(no name)"));
    node.appendChild(el("span", "detail", n.detail));
    if (a.type !== "run") node.appendChild(el("span", "kind", a.type));
    var problems = badAt([n.stage, n.action]);
    node.title = a.name + (problems.length ? "\n" + problems.map(function (p) { return "line " + p.line + ": " + p.message; }).join("\n") : "")
      + "\n(Enter: edit; Alt+arrows: move; Delete: delete; drag to another stage or group)";
    if (problems.length) node.classList.add("bad");
    if (S.selected && S.selected.length === 2 && S.selected[0] === n.stage && S.selected[1] === n.action) node.classList.add("selected");
    place(node, n.x, n.y, g.box_w, g.box_h);
    nodeEvents(node, n.stage, n.action);
    box.appendChild(node);
  });
  graphEl.appendChild(box);
}

function drawEmpty() {
  var box = el("div", "empty");
  if (S.text.trim()) {
    box.appendChild(el("p", "muted", "No stages yet: add one with “+ Stage”."));
  } else {
    box.appendChild(el("p", "", "A new pipeline. Start from:"));
    var choices = el("div", "choices");
    Object.keys(initial.templates).forEach(function (name) {
      var b = el("button", "", initial.templates[name].title);
      b.type = "button";
      b.dataset.template = name;
      b.addEventListener("click", function () { setText(initial.templates[name].text, false); check(); });
      choices.appendChild(b);
    });
    box.appendChild(choices);
  }
  graphEl.appendChild(box);
}

function select(sel) {
  S.selected = sel;
  S.drawn = null;
  drawGraph();
  drawForm();
}

function refocus() {
  if (!S.selected) return;
  var q = S.selected.length === 1 ? '.stage-head[data-stage="' + S.selected[0] + '"]'
    : '.node[data-stage="' + S.selected[0] + '"][data-action="' + S.selected[1] + '"]';
  var target = graphEl.querySelector(q);
  if (target && (document.activeElement === document.body || graphEl.contains(document.activeElement))) target.focus();
}

/* An action after an edit: found by stage and name (its index may have changed). */
function byName(stage, name) {
  return function (m) {
    var st = m.stages[stage];
    if (!st) return null;
    for (var j = st.actions.length - 1; j >= 0; j--) if (st.actions[j].name === name) return [stage, j];
    return null;
  };
}

function nodeEvents(node, i, j) {
  node.addEventListener("click", function () { select([i, j]); refocus(); });
  node.addEventListener("dragstart", function (ev) {
    S.dragging = { action: [i, j] };
    ev.dataTransfer.setData("text/plain", "action " + i + " " + j);
    ev.dataTransfer.effectAllowed = "move";
    graphEl.classList.add("dragging");
  });
  node.addEventListener("dragend", function () { S.dragging = null; graphEl.classList.remove("dragging"); });
  node.addEventListener("keydown", function (ev) {
    var a = S.model.stages[i].actions[j];
    if (ev.altKey && (ev.key === "ArrowLeft" || ev.key === "ArrowRight")) {
      var to = i + (ev.key === "ArrowLeft" ? -1 : 1);
      if (to >= 0 && to < S.model.stages.length) moveAction(i, j, to, 1);
      ev.preventDefault();
    } else if (ev.altKey && (ev.key === "ArrowUp" || ev.key === "ArrowDown")) {
      var order = Math.max(1, a.run_order + (ev.key === "ArrowUp" ? -1 : 1));
      if (order !== a.run_order) moveAction(i, j, i, order);
      ev.preventDefault();
    } else if (ev.key === "Delete") {
      deleteAction(i, j);
      ev.preventDefault();
    }
  });
}

function moveAction(i, j, to, order) {
  var name = S.model.stages[i].actions[j].name;
  edit("move_action", { stage: i, action: j, to_stage: to, run_order: order }, byName(to, name));
}

function stageEvents(head, i) {
  head.addEventListener("click", function () { select([i]); refocus(); });
  head.addEventListener("dragstart", function (ev) {
    S.dragging = { stage: i };
    ev.dataTransfer.setData("text/plain", "stage " + i);
    ev.dataTransfer.effectAllowed = "move";
  });
  head.addEventListener("dragend", function () { S.dragging = null; });
  head.addEventListener("dragover", function (ev) {
    if (S.dragging && S.dragging.stage !== undefined) { ev.preventDefault(); head.classList.add("drop-target"); }
  });
  head.addEventListener("dragleave", function () { head.classList.remove("drop-target"); });
  head.addEventListener("drop", function (ev) {
    ev.preventDefault();
    var d = S.dragging;
    S.dragging = null;
    if (d && d.stage !== undefined && d.stage !== i) moveStage(d.stage, i);
  });
  head.addEventListener("keydown", function (ev) {
    if (ev.altKey && (ev.key === "ArrowLeft" || ev.key === "ArrowRight")) {
      var to = i + (ev.key === "ArrowLeft" ? -1 : 1);
      if (to >= 0 && to < S.model.stages.length) moveStage(i, to);
      ev.preventDefault();
    } else if (ev.key === "Delete") {
      deleteStage(i);
      ev.preventDefault();
    }
  });
}

function moveStage(from, to) {
  edit("move_stage", { stage: from, to: to }, function () { return [to]; });
}

function dropZone(zone, stage, order) {
  zone.addEventListener("dragover", function (ev) {
    if (S.dragging && S.dragging.action) { ev.preventDefault(); zone.classList.add("drop-target"); }
  });
  zone.addEventListener("dragleave", function () { zone.classList.remove("drop-target"); });
  zone.addEventListener("drop", function (ev) {
    ev.preventDefault();
    var d = S.dragging;
    S.dragging = null;
    graphEl.classList.remove("dragging");
    if (d && d.action) moveAction(d.action[0], d.action[1], stage, order());
  });
}

/* ------------------------------------------------------------------ stage and action commands */

function addStage() {
  var n = S.model ? S.model.stages.length : 0;
  edit("add_stage", { index: n, name: "stage-" + (n + 1) }, function () { return [n]; });
}

function addAction(i) {
  var n = S.model.stages[i].actions.length;
  edit("add_action", { stage: i, type: "run" }, function () { return [i, n]; });
}

function deleteStage(i) {
  var s = S.model.stages[i];
  ask("Delete stage “" + s.name + "” and its " + s.actions.length + " action(s)?",
    [["Delete", "danger", function () { S.selected = null; edit("delete_stage", { stage: i }); }]]);
}

/* Deleting a producer asks what becomes of the actions that take its artifacts. */
function deleteAction(i, j) {
  var a = S.model.stages[i].actions[j], users = [];
  S.model.stages.forEach(function (s) {
    s.actions.forEach(function (b) {
      if (b.inputs.some(function (x) { return a.outputs.indexOf(x) >= 0; })) users.push(s.name + " / " + b.name);
    });
  });
  var done = function (mode) { return function () { S.selected = null; edit("delete_action", { stage: i, action: j, consumers: mode }); }; };
  if (!users.length) {
    ask("Delete action “" + a.name + "”?", [["Delete", "danger", done("keep")]]);
    return;
  }
  ask("“" + a.name + "” makes " + a.outputs.join(", ") + ", which " + users.join(", ") + " take(s) as input. What becomes of them?",
    [["Remove those inputs", "", done("drop")], ["Delete them too", "danger", done("delete")],
     ["Keep them (fix by hand)", "", done("keep")]]);
}

function ask(question, choices) {
  var dlg = $("dialog"), f = $("dialog-form");
  f.textContent = "";
  f.appendChild(el("p", "", question));
  var row = el("div", "row");
  choices.concat([["Cancel", "", null]]).forEach(function (c) {
    var b = el("button", c[1], c[0]);
    b.type = "button";
    b.addEventListener("click", function () { dlg.close(); if (c[2]) c[2](); });
    row.appendChild(b);
  });
  f.appendChild(row);
  dlg.showModal();
  row.firstChild.focus();
}

function showText(title, text) {
  var dlg = $("dialog"), f = $("dialog-form");
  f.textContent = "";
  f.appendChild(el("h3", "", title));
  var pre = el("pre", "diff");
  text.split("\n").forEach(function (line) {
    pre.appendChild(el("span", line[0] === "+" ? "add" : line[0] === "-" ? "del" : "", line + "\n"));
  });
  f.appendChild(pre);
  var b = el("button", "", "Close");
  b.type = "button";
  b.addEventListener("click", function () { dlg.close(); });
  f.appendChild(b);
  dlg.showModal();
}
