"""What the daemon shows of itself: `metrics` (the Prometheus registry; served by
licd.shells.metrics_http), `alerts` (usage and expiry rules) and `hooks` (runs the
operator's alert hook). They listen to the core's events and read the engine; none
decides anything.
"""
