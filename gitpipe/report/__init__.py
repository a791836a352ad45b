"""The static report site: HTML pages rendered with jinja2 from the store.

    reporter = Reporter(settings, store)
    store.listeners.append(reporter.on_event)   # the daemon: keep the site current
    reporter.render_all()                       # `gitpipe report`: rebuild everything

Layout under `settings.site_dir` (links are relative, so it works from file:// too):

    index.html                      every pipeline: last run, success rate, trend
    site.css, site.js               the one stylesheet and the one script of every page
    <repo>/index.html               the newest runs of a repo, a duration chart
    <repo>/page-<n>.html            older runs, PAGE_SIZE per page (1 = the oldest)
    <repo>/environments.html        releases per environment (once the repo has deployed)
    <repo>/runs/<id>.html           one run: graph, commit, approvals, artifacts, logs
    <repo>/runs/<id>/logs/*.txt     each attempt's whole log as plain text
    <repo>/runs/<id>/artifacts/...  artifacts: one file as itself, several as a .zip

Modules: reporter (what to re-render when), views/listing (what a page shows), charts
(SVG geometry), logview (log excerpts), data (approvals, releases), files (paths,
atomic writes), render (jinja2), fmt (times, sizes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gitpipe.report.reporter import Reporter, run_url

__all__ = ["Reporter", "run_url"]


def __getattr__(name: str) -> Any:
    """Reporter and run_url, imported when asked for: `gitpipe edit` uses charts alone and
    starts faster without jinja2 and the store."""
    if name in __all__:
        from gitpipe.report import reporter

        return getattr(reporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
