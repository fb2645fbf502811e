"""The vocabulary every layer shares: outcomes as a type, phases of a check's time, the metric registry, paired
statistics, locks between processes. Imports nothing else of the package; no torch at import time."""
