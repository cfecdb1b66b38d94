"""LLM serving helpers: the offline model for the CPU twin, and the Serve config preflight."""

import os
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ray-cml" / MODEL_NAME
)
