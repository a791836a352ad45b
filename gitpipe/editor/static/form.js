/* gitpipe edit: the problems list and the form of the selected stage or action, built from
   the key definitions the validator uses (gitpipe/keys.py). */

/* ------------------------------------------------------------------ problems */

function drawProblems() {
  var ul = $("problems"), count = $("count");
  ul.textContent = "";
  count.textContent = String(S.problems.length);
  count.className = "count" + (S.problems.length ? " bad" : "");
  if (!S.problems.length) {
    if (S.text.trim()) ul.appendChild(el("li", "none", "none: gitpipe validate passes"));
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
  } else if (k.kind === "matrix") {
    c = area(Object.keys(value || {}).map(function (n) { return n + "=" + [].concat(value[n]).join(", "); }).join("\n"), function (val) {
      var matrix = {};
      val.split("\n").forEach(function (line) {
        var at = line.indexOf("=");
        if (at > 0) matrix[line.slice(0, at).trim()] = list(line.slice(at + 1));
      });
      set("matrix")(matrix);
    });
    c.placeholder = "KEY=value, value, one key a line";
  } else if (k.kind === "caches") {
    c = area((value || []).map(function (e) { return [].concat(e.key || []).join(", ") + " : " + [].concat(e.paths || []).join(", "); }).join("\n"), function (val) {
      var caches = [];
      val.split("\n").forEach(function (line) {
        var at = line.indexOf(":");
        if (at >= 0 && line.slice(at + 1).trim()) caches.push({ key: list(line.slice(0, at)), paths: list(line.slice(at + 1)) });
      });
      set("cache")(caches);
    });
    c.placeholder = "key files : paths, one cache a line (requirements*.txt : .venv, ~/.cache/pip)";
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
