/* gitpipe report: small progressive enhancements; every page works without them. */
(function () {
  "use strict";

  function ago(ms) {
    var s = Math.max(0, Math.round(ms / 1000));
    if (s < 45) return "just now";
    var m = Math.round(s / 60);
    if (m < 60) return m + " min ago";
    var h = Math.round(m / 60);
    if (h < 24) return h + (h === 1 ? " hour ago" : " hours ago");
    var d = Math.round(h / 24);
    if (d < 30) return d + (d === 1 ? " day ago" : " days ago");
    return null;
  }

  function span(ms) {
    var s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + ("0" + (s % 60)).slice(-2) + "s";
    return Math.floor(s / 3600) + "h " + ("0" + Math.floor((s % 3600) / 60)).slice(-2) + "m";
  }

  /* "2026-11-26 10:22 UTC" becomes "5 min ago", the local time in the tooltip. */
  function times() {
    var now = Date.now();
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var t = Date.parse(el.getAttribute("datetime"));
      if (isNaN(t)) return;
      el.title = new Date(t).toLocaleString();
      if (el.classList.contains("rel")) {
        var text = ago(now - t);
        if (text) el.textContent = text;
      } else if (el.classList.contains("since")) {
        el.textContent = (el.getAttribute("data-prefix") || "running for") + " " + span(now - t);
      }
    });
  }

  /* Pages of unfinished runs reload themselves: keep the scroll position and open logs. */
  function keep() {
    var live = document.querySelector('meta[http-equiv="refresh"]');
    var key = "gitpipe:" + location.pathname;
    var store;
    try { store = window.sessionStorage; } catch (e) { return; }
    if (!store) return;
    var saved = null;
    try { saved = JSON.parse(store.getItem(key) || "null"); } catch (e) { saved = null; }
    if (saved && !location.hash) {
      (saved.open || []).forEach(function (id) {
        var el = document.getElementById(id);
        if (el && el.tagName === "DETAILS") el.open = true;
      });
      (saved.closed || []).forEach(function (id) {
        var el = document.getElementById(id);
        if (el && el.tagName === "DETAILS") el.open = false;
      });
      window.scrollTo(0, saved.y || 0);
    }
    window.addEventListener("pagehide", function () {
      if (!live) { store.removeItem(key); return; }
      var open = [], closed = [];
      document.querySelectorAll("details[id]").forEach(function (el) { (el.open ? open : closed).push(el.id); });
      store.setItem(key, JSON.stringify({ y: window.scrollY, open: open, closed: closed }));
    });
  }

  /* Open logs start at their end (where a failure or the latest output is), unless a line is linked. */
  function tails() {
    var target = location.hash ? document.getElementById(location.hash.slice(1)) : null;
    document.querySelectorAll("details[open] > .log, details[open] > details[open] > .log").forEach(function (log) {
      if (!target || !log.contains(target)) log.scrollTop = log.scrollHeight;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    times();
    tails();
    keep();
    if (document.querySelector("time.since")) setInterval(times, 1000);
  });
})();
