"""`licd`, the command line: `main` (the commands), `admin_client` (one request on the
admin socket), `format` (tables and JSON, every value escaped), `policy` (the licence
policy options of `licence add/update`), `report` (usage reports from the audit log).
"""
