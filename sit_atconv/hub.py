"""Pretrained weights from the internet on machines that may be offline: the cache first, then one quick contact.

diffusers and timm retry a hub that does not answer for half a minute or more, then fail with a long traceback
whose advice names none of this project's settings. `cached_or_reachable` looks in the Hugging Face cache first,
then asks the hub once (with HF_HUB_OFFLINE set, not at all), and otherwise raises one `WeightsUnavailable`
naming the setting that takes a local copy, before any run folder or output is created.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

CONTACT_TIMEOUT = 5.0  # seconds for the one contact: a machine without a route answers at once or never
_contacts: dict[str, str | None] = {}  # url -> why it cannot be reached (None: it answered), once per process


class WeightsUnavailable(FileNotFoundError):
    """Pretrained weights are neither on this machine nor downloadable from it."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks never to contact the hub (read where huggingface_hub reads it, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable(url: str) -> str | None:
    """Why `url`'s server cannot be reached with one request of CONTACT_TIMEOUT seconds (any HTTP answer counts
    as reached), or None; HF_HUB_OFFLINE counts as unreachable without a request. Asked once per process."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if url not in _contacts:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=CONTACT_TIMEOUT).close()
            _contacts[url] = None
        except urllib.error.HTTPError:  # the server answered, with an error status: it is there
            _contacts[url] = None
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            _contacts[url] = f"no answer from {url}: {reason}"
    return _contacts[url]


def cached_or_reachable(repo_id: str, filenames: list[str], what: str, local_copy: str) -> Path | None:
    """The cached snapshot folder of hub repository `repo_id` when it holds all of `filenames`; None when they
    are not cached but the hub answers (the caller's loader downloads them); else WeightsUnavailable, one line
    starting with `what` (the weights and the setting that chose them) and ending with `local_copy` (how that
    setting takes a local copy)."""
    from huggingface_hub import constants, try_to_load_from_cache

    found = [try_to_load_from_cache(repo_id, name) for name in filenames]
    if all(isinstance(path, str) for path in found):
        return Path(found[0]).parent
    reason = unreachable(constants.ENDPOINT)
    if reason is None:
        return None
    raise WeightsUnavailable(
        f"{what}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and no download ({reason}); run "
        f"`hf download {repo_id}` on a machine with internet and copy its cache here, or pass a local copy: "
        f"{local_copy}"
    )
