"""The pytest wiring and reporting: settings, the session, cases (what a suite gets), the speed checks' session
plugin, results and their rendering. The faces above it (plugin.py, api.py, cli.py) are the only importers."""
