"""The starting points `gitpipe edit` offers for a new file; each passes `gitpipe validate`."""

from __future__ import annotations

PYTHON = '''\
# gitpipe pipeline of a Python package: build a wheel, test it, deploy it.
# Reference: the README's ".pipeline.toml" section; check with `gitpipe validate`.

[trigger]
branches = ["main", "release/*"]
tags = ["v*"]

[[stage]]
name = "build"

  [[stage.action]]
  name = "wheel"
  run = "python -m pip wheel --no-deps -w dist ."
  outputs = { wheel = "dist/*.whl" }   # artifact name = glob(s) in the worktree
  timeout = "10m"

[[stage]]
name = "test"

  [[stage.action]]
  name = "tests"
  inputs = ["wheel"]                   # restored into this action's worktree
  run = """
python -m venv .venv
.venv/bin/pip install dist/*.whl pytest
.venv/bin/python -m pytest -q
"""

[[stage]]
name = "deploy"

  [[stage.action]]
  name = "deploy"
  type = "deploy"
  inputs = ["wheel"]
  environment = "production"
  target = "ssh://deploy@app.example.com/srv/app"
  source = "dist"
  after_switch = "sudo systemctl restart app"
  when = { branches = ["main"] }       # only main deploys
'''

SITE = '''\
# gitpipe pipeline of a static site: build it, then deploy it once a person approves.
# Reference: the README's ".pipeline.toml" section; check with `gitpipe validate`.

[trigger]
branches = ["main"]

[[stage]]
name = "build"

  [[stage.action]]
  name = "site"
  run = "make html"
  outputs = { site = "public/**" }

[[stage]]
name = "deploy"

  [[stage.action]]
  name = "sign-off"
  type = "approval"
  message = "Publish {short_sha}?"

  [[stage.action]]
  name = "publish"
  type = "deploy"
  run_order = 2                        # after the approval
  inputs = ["site"]
  environment = "production"
  target = "ssh://deploy@www.example.com/srv/www"
  source = "public"
'''

EMPTY = '''\
# gitpipe pipeline. Stages run in file order; actions of a stage run side by side.
# Reference: the README's ".pipeline.toml" section; check with `gitpipe validate`.

[[stage]]
name = "build"

  [[stage.action]]
  name = "build"
  run = "echo build"
'''

TEMPLATES = {"python": ("Python package: wheel, tests, deploy", PYTHON),
             "site": ("Static site: build, deploy after approval", SITE),
             "empty": ("Empty: one stage, one action", EMPTY)}
