"""gitpipe: continuous delivery for people who keep their own git server.

Nothing is imported here on purpose: the git hooks import `gitpipe.queue` and
every millisecond of import time is added to each `git push`.
"""

__version__ = "0.1.0"
