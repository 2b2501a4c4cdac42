"""Persistence: `sqlite` (the typed persistence API on SQLite), `writer` (the
group-commit writer, which knows no SQL: a PostgreSQL store would use it too), `records`
(the typed rows it reads and writes), `migrations/` (numbered schema files), `keyfile`
(the daemon's signing key in the state directory). The only part of licd that imports
sqlite3 or aiosqlite.
"""
