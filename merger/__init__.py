"""The merger role: composes the deltas validators accepted into a new checkpoint and publishes it.

See merger/node.py (the round as named steps: collect -> fetch -> merge -> publish).
"""
