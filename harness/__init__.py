"""The benchmark harness: everything that is not a PTQ method (runs, models, data, metrics, records)."""
