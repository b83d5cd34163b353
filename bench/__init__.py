"""The hub's benchmark: ``python -m bench`` (see ``bench/__main__.py``).

Layout:

- ``bench/__main__.py``  command line, orchestration, the table and the target checks
- ``bench/scenarios.py`` the scenarios and their publisher settings per server
- ``bench/servers.py``   starting the hub / nchan pinned to core 0, /proc accounting
- ``bench/loadgen.py``   the load generator process (pinned to core 1): subscribers as raw
  uvloop ``BufferedProtocol`` objects that count events in place, a sample of probe streams
  that parse timestamps for latency, and a paced publisher in the same event loop
"""
