"""Keep third-party chatter (per-load progress bars, deprecation notices) out of our output.

Our own progress bars use tqdm directly and are unaffected. Call before importing
transformers; environment variables already set by the user win.
"""

from __future__ import annotations

import os
import warnings


def quiet_third_party() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
