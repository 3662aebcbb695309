"""What every role shares: data, model layout, expert assignments, delta artifacts, merging.

Modules that need no torch do not import it, so `moesaic --help` stays fast.
"""
