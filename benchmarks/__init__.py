"""licd's benchmark harness: load generator, floors and scenarios, run by `make bench`.

Never run by CI and never imported by licd: it starts real daemons on 127.0.0.1, drives
them from separate load-generator processes, measures the floors (a bare asyncio server,
raw SQLite) in the same run, and prints each figure beside its floor and its target.
"""
