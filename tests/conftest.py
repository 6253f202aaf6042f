"""No test may touch the network: the hub is offline and its cache is an empty temporary folder.

Set before any test module imports huggingface_hub/diffusers, which read these variables at import."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sit-atconv-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist runs one worker per core: give each worker its share of the cores, since more intra-op
# threads than cores makes torch's small CPU kernels many times slower (threads spin waiting for a core).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# Triton decides at kernel definition whether to compile or interpret: without an NVIDIA GPU, its CPU
# interpreter runs the same kernels, so tests/test_atconv_triton.py checks them here too. Set here,
# before any test module imports sit_atconv (or torch internals import triton).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)` makes `folder` read-only until the test ends. Root, whom permissions do not stop,
    gets an `os.access` that reads the owner's write bit, so the code under test sees what other users would."""
    import stat

    changed = []

    def make(folder):
        folder.chmod(0o555)
        changed.append(folder)
        if os.geteuid() == 0:
            real_access = os.access

            def access(path, mode, *args, **kwargs):
                if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
                    return False
                return real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        return folder

    yield make
    for folder in changed:
        folder.chmod(0o755)
