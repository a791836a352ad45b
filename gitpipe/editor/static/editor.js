/* gitpipe edit: the page. The server owns the file, the validator and every edit of the TOML
   (tomlkit keeps the user's comments); this script draws what it returns and sends it edits. */
(function () {
  "use strict";

  var initial = JSON.parse(document.getElementById("state").textContent);
  var token = new URLSearchParams(location.search).get("token") || "";
  var KEYS = initial.keys.action;
  var $ = function (id) { return document.getElementById(id); };
  var textarea = $("text"), gutter = $("gutter"), marks = $("marks"), graphEl = $("graph"), formEl = $("form");

  var S = {
    text: initial.text, base: initial.base, saved: initial.exists ? initial.text : null,
    model: null, problems: [], selected: null, history: [initial.text], at: 0, typedAt: 0, seq: 0, shown: 0,
    stale: false, dragging: null, pending: 0
  };
  window.gitpipeEditor = S; // for tests and the benchmark: the page's state, read-only

  /* ------------------------------------------------------------------ server calls */

  function post(path, body) {
    S.pending++;
    return fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json", "X-Gitpipe-Token": token },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return { error: "HTTP " + r.status }; });
    }, function () {
      status("the editor stopped (gitpipe edit is no longer running): your text is still here", "bad");
      return { error: "no connection" };
    }).then(function (res) { setTimeout(function () { S.pending--; }, 0); return res; });
  }

  function check() {
    var seq = ++S.seq, text = S.text;
    return post("/api/check", { text: text }).then(function (res) {
      if (res.error || seq < S.shown) return;
      S.shown = seq;
      show(res);
    });
  }

  function edit(kind, args, focus) {
    return post("/api/edit", { text: S.text, op: { kind: kind, args: args } }).then(function (res) {
      if (res.error) { status(res.error, "bad"); return; }
      setText(res.text, false);
      S.shown = ++S.seq;
      if (focus) S.selected = focus(res.check.model) || S.selected;
      show(res.check);
      refocus();
    });
  }

  /* ------------------------------------------------------------------ text and history */

  function setText(text, typed) {
    S.text = text;
    if (textarea.value !== text) textarea.value = text;
    var now = Date.now();
    if (typed && S.typedAt && now - S.typedAt < 1000 && S.at === S.history.length - 1 && S.at > 0) {
      S.history[S.at] = text; // one undo step per burst of typing
    } else if (S.history[S.at] !== text) {
      S.history = S.history.slice(0, S.at + 1);
      S.history.push(text);
      S.at = S.history.length - 1;
    }
    S.typedAt = typed ? now : 0;
    gutterLines();
    dirty();
  }

  function go(step) {
    var at = S.at + step;
    if (at < 0 || at >= S.history.length) return;
    S.at = at;
    S.text = S.history[at];
    textarea.value = S.text;
    S.typedAt = 0;
    gutterLines();
    dirty();
    check();
  }

  function dirty() {
    $("undo").disabled = S.at === 0;
    $("redo").disabled = S.at >= S.history.length - 1;
    if (S.saved === null) status("new file, not saved yet", "dirty");
    else if (S.text !== S.saved) status("unsaved changes", "dirty");
    else status("saved", "");
  }

  function status(text, kind) {
    var el = $("status");
    el.textContent = text;
    el.className = "status " + (kind || "");
  }

  function gutterLines() {
    var n = S.text.split("\n").length, bad = {};
    S.problems.forEach(function (p) { if (p.line) bad[p.line] = (bad[p.line] ? bad[p.line] + "\n" : "") + p.message; });
    var key = n + JSON.stringify(bad);
    if (key === S.gutter) { scrolled(); return; }
    S.gutter = key;
    gutter.textContent = "";
    marks.textContent = "";
    var inner = el("span"); // moved with the text's scrolling
    Object.keys(bad).forEach(function (line) { // the problem's line, marked in the text too
      var m = el("div");
      m.dataset.line = line;
      m.style.top = (8 + (Number(line) - 1) * 18) + "px";
      inner.appendChild(m);
    });
    marks.appendChild(inner);
    for (var i = 1; i <= n; i++) {
      var line = document.createElement("div");
      line.textContent = String(i);
      line.dataset.line = String(i);
      if (bad[i]) { line.className = "bad"; line.title = bad[i]; }
      gutter.appendChild(line);
    }
    scrolled();
  }

  function scrolled() {
    gutter.scrollTop = textarea.scrollTop;
    if (marks.firstChild) marks.firstChild.style.transform = "translateY(" + -textarea.scrollTop + "px)";
  }

  function gotoLine(line) {
    var lines = S.text.split("\n"), start = 0;
    for (var i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
    textarea.focus();
    textarea.setSelectionRange(start, start + (lines[line - 1] || "").length);
    textarea.scrollTop = Math.max(0, (line - 5) * 18);
    scrolled();
  }

  /* ------------------------------------------------------------------ what the server said */

  function show(res) {
    S.problems = res.problems || [];
    S.stale = !res.model;
    if (res.model) S.model = res.model;
    $("stale").hidden = !S.stale;
    if (S.stale && S.model) pinByLine();
    if (S.selected && S.model && !exists(S.selected)) S.selected = null;
    var key = JSON.stringify([S.model, S.problems, S.selected, S.stale, !S.text.trim()]);
    if (key !== S.drawn) { // typing inside a comment or a value changes nothing drawn: keep the DOM
      S.drawn = key;
      drawGraph();
      drawProblems();
      drawForm();
    }
    gutterLines();
  }

  /* A text that is not TOML has no fresh lines: pin its problems by the last good graph's lines. */
  function pinByLine() {
    var starts = [];
    S.model.stages.forEach(function (s, i) {
      starts.push([s.line, [i]]);
      s.actions.forEach(function (a, j) { starts.push([a.line, [i, j]]); });
    });
    starts.sort(function (a, b) { return a[0] - b[0]; });
    S.problems.forEach(function (p) {
      var node = null;
      starts.forEach(function (s) { if (s[0] && s[0] <= p.line) node = s[1]; });
      p.node = node;
    });
  }

  function exists(sel) {
    var st = S.model.stages[sel[0]];
    return st && (sel.length === 1 || !!st.actions[sel[1]]);
  }

  function badAt(node) {
    return S.problems.filter(function (p) {
      return p.node && p.node.length === node.length && p.node.every(function (v, k) { return v === node[k]; });
    });
  }

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

  /* ------------------------------------------------------------------ problems */

  function drawProblems() {
    var ul = $("problems"), count = $("count");
    ul.textContent = "";
    count.textContent = String(S.problems.length);
    count.className = "count" + (S.problems.length ? " bad" : "");
    if (!S.problems.length) {
      var li = el("li", "none", S.text.trim() ? "none: gitpipe validate passes" : "");
      ul.appendChild(li);
      return;
    }
    S.problems.forEach(function (p) {
      var li = el("li"), b = el("button");
      b.type = "button";
      b.appendChild(el("span", "at", p.line ? "line " + p.line : "file"));
      b.appendChild(document.createTextNode(p.message));
      b.addEventListener("click", function () {
        if (p.node) select(p.node);
        if (p.line) gotoLine(p.line);
      });
      li.appendChild(b);
      ul.appendChild(li);
    });
  }

  /* ------------------------------------------------------------------ the form */

  function drawForm() {
    formEl.textContent = "";
    if (!S.model || !S.selected) {
      formEl.appendChild(el("p", "muted small",
        "Select a stage or an action (click, or Tab to it and Enter). Drag an action to another stage or " +
        "group; drag a stage onto another to reorder. Keys: Alt+arrows move, Delete deletes, " +
        "Ctrl+Z / Ctrl+Shift+Z undo and redo, Ctrl+S saves."));
      return;
    }
    if (S.selected.length === 1) stageForm(S.selected[0]); else actionForm(S.selected[0], S.selected[1]);
  }

  function button(label, cls, fn) {
    var b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", fn);
    return b;
  }

  function stageForm(i) {
    var s = S.model.stages[i], n = S.model.stages.length;
    formEl.appendChild(el("h3", "", "stage " + s.name));
    formEl.appendChild(el("div", "where", "line " + s.line + " · " + s.actions.length + " action(s)"));
    field(formEl, "name", "the stage's name, unique in the pipeline", null, input("text", s.name, function (v) {
      edit("rename_stage", { stage: i, name: v });
    }), [i]);
    var row = el("div", "row");
    var left = button("← Move left", "", function () { moveStage(i, i - 1); });
    left.disabled = i === 0;
    var right = button("Move right →", "", function () { moveStage(i, i + 1); });
    right.disabled = i === n - 1;
    row.appendChild(left); row.appendChild(right);
    row.appendChild(button("+ Action", "", function () { addAction(i); }));
    row.appendChild(button("+ Stage after", "", function () {
      edit("add_stage", { index: i + 1, name: "stage-" + (n + 1) }, function () { return [i + 1]; });
    }));
    row.appendChild(button("Duplicate", "", function () {
      edit("duplicate_stage", { stage: i }, function () { return [i + 1]; });
    }));
    row.appendChild(button("Delete", "danger", function () { deleteStage(i); }));
    formEl.appendChild(row);
  }

  function input(type, value, onchange) {
    var e = el("input");
    e.type = type;
    e.value = value === undefined || value === null ? "" : String(value);
    e.spellcheck = false;
    e.addEventListener("change", function () { onchange(e.value); });
    return e;
  }

  function area(value, onchange) {
    var e = el("textarea");
    e.value = value || "";
    e.spellcheck = false;
    e.addEventListener("change", function () { onchange(e.value); });
    return e;
  }

  function choice(options, value, onchange) {
    var e = el("select");
    options.forEach(function (o) {
      var opt = el("option", "", o[1]);
      opt.value = o[0];
      if (o[0] === value) opt.selected = true;
      e.appendChild(opt);
    });
    e.addEventListener("change", function () { onchange(e.value); });
    return e;
  }

  var uid = 0;
  function field(parent, name, help, def, control, node) {
    var box = el("div", "field"), id = "f" + (++uid);
    var label = el("label", "", name);
    label.htmlFor = id;
    control.id = id;
    box.appendChild(label);
    var h = el("span", "help", help);
    if (def !== null && def !== undefined && !(Array.isArray(def) && !def.length)) {
      h.appendChild(document.createTextNode(" · default "));
      h.appendChild(el("span", "def", JSON.stringify(def)));
    }
    h.id = id + "-help";
    control.setAttribute("aria-describedby", h.id);
    box.appendChild(h);
    if ((control.tagName === "INPUT" || control.tagName === "TEXTAREA") && !control.placeholder && def !== null && def !== undefined) {
      control.placeholder = Array.isArray(def) ? def.join(", ") : String(def);
    }
    box.appendChild(control);
    var bad = S.problems.filter(function (p) {
      return p.node && node && p.node.join() === node.join() && p.message.indexOf('"' + name + '"') >= 0;
    });
    if (bad.length) { box.classList.add("bad"); control.title = bad.map(function (p) { return p.message; }).join("\n"); }
    box.dataset.key = name;
    parent.appendChild(box);
    return box;
  }

  function list(value) {
    return value.split(/[\n,]/).map(function (x) { return x.trim(); }).filter(Boolean);
  }

  function shown(v) {
    if (v === undefined || v === null) return "";
    if (Array.isArray(v)) return v.join(", ");
    return String(v);
  }

  /* Earlier actions' outputs: an earlier stage, or this stage with a lower run_order. */
  function available(i, order) {
    var out = [];
    S.model.stages.forEach(function (s, k) {
      s.actions.forEach(function (a) {
        if (k < i || (k === i && a.run_order < order)) a.outputs.forEach(function (o) { out.push([o, s.name + " / " + a.name]); });
      });
    });
    return out;
  }

  function actionForm(i, j) {
    var s = S.model.stages[i], a = S.model.stages[i].actions[j], v = a.values, node = [i, j];
    var set = function (key) { return function (value) { edit("set_key", { stage: i, action: j, key: key, value: value }); }; };
    formEl.appendChild(el("h3", "", a.name || "(no name)"));
    formEl.appendChild(el("div", "where", "stage " + s.name + " · " + a.type + " · line " + a.line));
    var row = el("div", "row");
    var targets = S.model.stages.map(function (st, k) { return [String(k), "to stage " + st.name]; });
    var mover = choice([["", "Move…"]].concat(targets.filter(function (t) { return t[0] !== String(i); })), "", function (val) {
      if (val !== "") moveAction(i, j, Number(val), 1);
    });
    mover.setAttribute("aria-label", "move to another stage");
    row.appendChild(mover);
    row.appendChild(button("Duplicate", "", function () {
      edit("duplicate_action", { stage: i, action: j }, function () { return [i, j + 1]; });
    }));
    row.appendChild(button("Delete", "danger", function () { deleteAction(i, j); }));
    formEl.appendChild(row);
    var builtin = initial.keys.types.slice(0, 3).indexOf(a.type) >= 0;
    KEYS.forEach(function (k) {
      if (k.types.length && k.types.indexOf(a.type) < 0 && !(!builtin && k.types.indexOf(initial.keys.plugin) >= 0)) return;
      keyField(k, i, j, a, v, node, set);
    });
    if (!builtin) formEl.appendChild(el("p", "muted small", "The plugin's own keys: edit them in the text."));
  }

  function keyField(k, i, j, a, v, node, set) {
    var value = v[k.name], c;
    if (k.name === "name") {
      c = input("text", a.name, function (val) {
        if (val && val !== a.name) edit("rename_action", { stage: i, action: j, name: val }, byName(i, val));
      });
    } else if (k.name === "type") {
      c = choice(initial.keys.types.map(function (t) { return [t, t]; }), a.type, function (val) { set("type")(val === "run" ? null : val); });
    } else if (k.kind === "choice") {
      c = choice([["", "(default)"]].concat(k.choices.map(function (t) { return [t, t]; })), value || "", function (val) { set(k.name)(val || null); });
    } else if (k.kind === "boolean") {
      c = choice([["", "(default)"], ["true", "true"], ["false", "false"]], value === undefined ? "" : String(value), function (val) {
        set(k.name)(val === "" ? null : val === "true");
      });
    } else if (k.kind === "integer") {
      c = input("number", value, function (val) { set(k.name)(val === "" ? null : Number(val)); });
      if (k.minimum !== null) c.min = String(k.minimum);
    } else if (k.kind === "text") {
      c = area(typeof value === "string" ? value : "", function (val) { set(k.name)(val); });
    } else if (k.kind === "inputs") {
      c = inputsField(i, a, set("inputs"));
    } else if (k.kind === "outputs") {
      c = outputsField(i, j, value && typeof value === "object" ? value : {}, set("outputs"));
    } else if (k.kind === "env") {
      c = area(Object.keys(value || {}).map(function (n) { return n + "=" + value[n]; }).join("\n"), function (val) {
        var env = {};
        val.split("\n").forEach(function (line) {
          var at = line.indexOf("=");
          if (at > 0) env[line.slice(0, at).trim()] = line.slice(at + 1);
        });
        set("env")(env);
      });
      c.placeholder = "NAME=value, one a line";
    } else if (k.kind === "targets") {
      c = area(Array.isArray(value) ? value.join("\n") : value || "", function (val) {
        var urls = list(val);
        set("target")(urls.length === 1 && !Array.isArray(value) ? urls[0] : urls);
      });
      c.placeholder = "one URL a line";
    } else if (k.kind === "table") { // when
      c = el("div", "pairs");
      var w = value || {};
      ["branches", "tags"].forEach(function (part) {
        var p = el("div", "pair"), label = el("input", "k");
        label.value = part; label.readOnly = true; label.tabIndex = -1;
        p.appendChild(label);
        p.appendChild(input("text", shown(w[part]), function (val) {
          var next = {};
          ["branches", "tags"].forEach(function (q) { if (w[q] !== undefined) next[q] = w[q]; });
          if (val.trim()) next[part] = list(val); else delete next[part];
          set("when")(next);
        }));
        p.lastChild.setAttribute("aria-label", "when " + part);
        c.appendChild(p);
      });
    } else if (k.kind === "strings" || k.kind === "secrets") {
      c = input("text", shown(value), function (val) { set(k.name)(list(val)); });
      c.placeholder = "comma-separated";
    } else {
      c = input("text", shown(value), function (val) { set(k.name)(val); });
    }
    field(formEl, k.name, k.help, k.name === "type" ? null : k.default, c, node);
  }

  function inputsField(i, a, save) {
    var box = el("div", "checks"), have = a.inputs.slice();
    var offer = available(i, a.run_order);
    have.forEach(function (x) { if (!offer.some(function (o) { return o[0] === x; })) offer.push([x, "not an earlier output"]); });
    if (!offer.length) box.appendChild(el("span", "muted small", "no earlier action has outputs"));
    offer.forEach(function (o) {
      var label = el("label"), cb = el("input");
      cb.type = "checkbox";
      cb.checked = have.indexOf(o[0]) >= 0;
      cb.value = o[0];
      cb.addEventListener("change", function () {
        var next = [];
        box.querySelectorAll("input:checked").forEach(function (x) { next.push(x.value); });
        save(next);
      });
      label.appendChild(cb);
      label.appendChild(document.createTextNode(o[0] + "  "));
      label.appendChild(el("span", "muted small", "from " + o[1]));
      box.appendChild(label);
    });
    return box;
  }

  function outputsField(i, j, outputs, save) {
    var box = el("div", "pairs");
    var rows = Object.keys(outputs).map(function (n) { return [n, outputs[n]]; }).concat([["", ""]]);
    rows.forEach(function (r) {
      var p = el("div", "pair"), name = el("input", "k"), globs = el("input");
      name.value = r[0]; name.placeholder = "name"; name.setAttribute("aria-label", "artifact name");
      globs.value = shown(r[1]); globs.placeholder = "glob(s), comma-separated"; globs.setAttribute("aria-label", "globs");
      name.addEventListener("change", function () {
        if (r[0] && name.value && name.value !== r[0]) edit("rename_output", { stage: i, action: j, old: r[0], new: name.value });
        else if (!r[0] && name.value && globs.value) commit();
      });
      globs.addEventListener("change", commit);
      p.appendChild(name); p.appendChild(globs);
      box.appendChild(p);
    });
    function commit() {
      var next = {};
      box.querySelectorAll(".pair").forEach(function (p) {
        var n = p.children[0].value.trim(), g = list(p.children[1].value), old = outputs[n];
        if (n && g.length) next[n] = g.length === 1 && !Array.isArray(old) ? g[0] : g;
      });
      save(next);
    }
    return box;
  }

  /* ------------------------------------------------------------------ save, reload, keys */

  function save(force) {
    return post("/api/save", { text: S.text, base: S.base, force: !!force }).then(function (res) {
      if (res.error) { status(res.error, "bad"); return; }
      if (res.changed) { changedOnDisk(res); return; }
      S.base = res.base;
      S.saved = S.text;
      $("banner").hidden = true;
      dirty();
      status(S.problems.length ? "saved, with " + S.problems.length + " problem(s)" : "saved", S.problems.length ? "bad" : "");
    });
  }

  function changedOnDisk(res) {
    var b = $("banner");
    b.textContent = "";
    b.appendChild(el("b", "", "The file changed on disk since it was loaded; nothing was written."));
    b.appendChild(button("Show the difference", "", function () { showText("On disk (−) and in the editor (+)", res.diff); }));
    b.appendChild(button("Reload from disk", "", reload));
    b.appendChild(button("Overwrite it", "danger", function () { save(true); }));
    b.hidden = false;
    status("not saved: the file changed on disk", "bad");
  }

  function reload() {
    post("/api/reload", {}).then(function (res) {
      if (res.error) { status(res.error, "bad"); return; }
      S.base = res.base;
      S.saved = res.text;
      setText(res.text, false);
      $("banner").hidden = true;
      show(res.check);
      dirty();
    });
  }

  textarea.addEventListener("input", function () {
    setText(textarea.value, true);
    check();
  });
  textarea.addEventListener("scroll", scrolled);
  textarea.addEventListener("keydown", function (ev) {
    if (ev.key === "Tab" && !ev.shiftKey && !ev.ctrlKey && !ev.altKey && textarea.dataset.tabs === "on") {
      ev.preventDefault();
      document.execCommand("insertText", false, "  ");
    } else if (ev.key === "Escape") {
      textarea.dataset.tabs = "off"; // Escape, then Tab: leave the text by keyboard
    } else if (ev.key === "Enter" || ev.key.length === 1) {
      textarea.dataset.tabs = "on";
    }
  });
  $("undo").addEventListener("click", function () { go(-1); });
  $("redo").addEventListener("click", function () { go(1); });
  $("save").addEventListener("click", function () { save(false); });
  $("add-stage").addEventListener("click", addStage);

  function theme(name) {
    if (name) document.documentElement.dataset.theme = name; else delete document.documentElement.dataset.theme;
    var dark = name ? name === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    $("theme").textContent = dark ? "Light" : "Dark";
  }
  var saved = null;
  try { saved = localStorage.getItem("gitpipe-edit-theme"); } catch (e) { saved = null; }
  theme(saved);
  $("theme").addEventListener("click", function () {
    var dark = document.documentElement.dataset.theme ? document.documentElement.dataset.theme === "dark"
      : matchMedia("(prefers-color-scheme: dark)").matches;
    var next = dark ? "light" : "dark";
    theme(next);
    try { localStorage.setItem("gitpipe-edit-theme", next); } catch (e) { /* private mode */ }
  });

  document.addEventListener("keydown", function (ev) {
    var mod = ev.ctrlKey || ev.metaKey, k = ev.key.toLowerCase();
    if (mod && k === "s") { ev.preventDefault(); save(false); }
    else if (mod && ((k === "z" && ev.shiftKey) || k === "y")) { ev.preventDefault(); go(1); }
    else if (mod && k === "z") { ev.preventDefault(); go(-1); }
  });
  window.addEventListener("beforeunload", function (ev) {
    if (S.saved === null ? S.text.trim() : S.text !== S.saved) { ev.preventDefault(); ev.returnValue = ""; }
  });

  $("file").textContent = initial.file;
  textarea.value = S.text;
  if (initial.check) show(initial.check); else { drawGraph(); drawProblems(); drawForm(); gutterLines(); }
  dirty();
  document.body.dataset.ready = "1";
})();
