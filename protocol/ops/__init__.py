"""Running a role process: atomic state writes, quiet logs and Prometheus metrics."""
