from gitpipe.cli import entry

entry()
