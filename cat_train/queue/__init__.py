"""`python -m cat_train queue`: batch runs and sweeps of one API-format workflow through ComfyUI servers.

The command is `cli.main` (its docstring is the summary, docs/batch.md the details). Beneath it, one concern a
module: `workflow` (the graph, values checked against /object_info), `plan` (the runs of a sweep and their file
names), `client` and `websocket` (ComfyUI's HTTP API and /ws), `dispatch` (runs over the servers: down, back,
cancel), `history` (what a finished prompt's /history says), `journal` (--out, --resume) and `report` (the
table, chart and best-run rule). The standard library is enough; Pillow draws the chart.
"""
