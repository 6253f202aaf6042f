"""No test may touch the network: the hub is offline and its cache is an empty temporary folder.

Set before any test module imports huggingface_hub/diffusers, which read these variables at import."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sit-atconv-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
