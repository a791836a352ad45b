"""`gitpipe edit`: a local web page that edits `.pipeline.toml` as a graph, forms and text.

server.py (HTTP, token, file on disk), model.py (tomlkit edits that keep the user's
formatting), check.py (validator problems and graph layout for the page), templates.py
(starting points for a new file), static/ (the page: HTML, CSS, JS; nothing from outside).
"""
