"""The I/O shells: sockets and processes around the core, thin and knowing no licences.

`server` (the TCP listener and its framing), `admin_server` (the admin Unix socket),
`upstream` (a site router's link to its upstream licd), `notify` (systemd's notify
protocol), `metrics_http` (the /metrics endpoint, serving what it is given to render).
Each hands what it reads to the core and writes back what the core answers.
"""
