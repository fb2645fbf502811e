"""Running transformers and torch: models and their sources, variants and how they run, the higher-precision
reference, instrumentation, memory and speed measurement. Imports common and verdicts, never the pytest wiring."""
