/* gitpipe edit, the page: state, the server's answers, the text and its history.
   The server owns the file, the validator and every edit of the TOML (tomlkit keeps the
   user's comments); the page draws what it returns and sends it edits. The server joins
   core.js, graph.js, form.js and main.js, in that order, into one function. */

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
