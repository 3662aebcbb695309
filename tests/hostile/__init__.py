"""Hostile-world tests (issue 6): a corpus of malformed delta artifacts and a parser fuzzer.

`corpus.py` holds the named artifact classes (importable without pytest or torch, so
scripts/security_counts.py can count them); the test modules run each class through the CLI and
through the validator's path.
"""
