"""The `recs` command line, and the jobs that compose several layers (generator, importers, demo, replay)."""
