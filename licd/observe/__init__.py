"""What the daemon shows of itself: `metrics` (the Prometheus registry and its endpoint)
and `alerts` (usage and expiry rules, and the hook they run). Both listen to the core's
events and read the engine; neither decides anything.
"""
