/* gitpipe edit: saving, reloading, the keyboard, the theme, and the start. */

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
