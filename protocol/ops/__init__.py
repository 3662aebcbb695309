"""Running a role process: atomic state writes, quiet logs, Prometheus metrics, free ports."""
