"""The core: what the daemon does with the engine's decisions, free of sockets and files.

`service` runs each operation (engine decision, store write, event) and `dispatch` maps
wire messages onto it, the one place errors become wire codes; `admin` holds the admin
operations, `router` a site router's relaying, `events` the event bus the log, audit,
metrics and alerts listen to, `audit_upkeep` the audit log's aggregation and retention,
`deferred` the future-like results that let replies wait for their commit, `keys` the
daemon's signer. The core never imports a shell (licd/shells): the composition root,
licd/daemon.py, hands it what it needs.
"""
