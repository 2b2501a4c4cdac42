"""Persistence: `sqlite` (the SQLite store with its group-commit writer), `records`
(the typed rows it reads and writes), `migrations/` (numbered schema files). The only
part of licd that imports sqlite3 or aiosqlite.
"""
