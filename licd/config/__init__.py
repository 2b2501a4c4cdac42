"""The configuration: `settings` (the whole file into frozen dataclasses, strictly),
`licences` (the [[licence]] tables and [groups]), `tomlreader` (the typed TOML table
reader both use, errors naming file and key).
"""
