"""Operator and benchmark scripts (runnable files; a package only so tests can import them)."""
