"""The `moesaic` console script: one entry point with a subcommand per task.

Command modules only build argparse parsers at import; heavy imports (torch, transformers)
happen inside the handlers so `moesaic --help` stays fast.
"""

__version__ = "0.1.0"
