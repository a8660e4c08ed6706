"""Models and data sets named as on the Hugging Face Hub (``ORG/NAME``), found in the local hub cache.

Nothing is ever downloaded: a name resolves to ``<cache>/models--ORG--NAME/snapshots/<commit>``
(``datasets--ORG--NAME`` for a data set), the commit read from ``refs/<revision>`` or given as a
commit hash.  The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (huggingface_hub's own order).  The one resolver kseed-fed and the
Flower apps share.
"""
from __future__ import annotations

import os
import re
from typing import Optional

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubCacheError(ValueError):
    """A hub name that is not in the local cache (the message names where kseed looked and the
    command that fetches it elsewhere)."""


def hub_cache() -> str:
    """The hub cache directory, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def is_hub_name(value: str) -> bool:
    """True for ``ORG/NAME`` that is not an existing path (a path wins over a name)."""
    return isinstance(value, str) and bool(_NAME.match(value)) and not os.path.exists(value)


def resolve(value: str, revision: Optional[str] = "main", kind: str = "model") -> str:
    """``value`` itself when it is not a hub name (a path), else the snapshot directory of
    ``ORG/NAME`` at ``revision`` (a branch or tag in ``refs/``, or a commit hash) in the local
    cache; HubCacheError when it is not there."""
    if not is_hub_name(value):
        return value
    revision = revision or "main"
    org, name = value.split("/")
    cache = hub_cache()
    repo = os.path.join(cache, f"{kind}s--{org}--{name}")
    ref = os.path.join(repo, "refs", revision)
    commit = None
    if os.path.isfile(ref):
        with open(ref, "r", encoding="utf-8") as f:
            commit = f.read().strip()
    elif _COMMIT.match(revision):
        commit = revision
    snap = os.path.join(repo, "snapshots", commit) if commit else None
    if snap is None or not os.path.isdir(snap):
        fetch = "huggingface-cli download" + (" --repo-type dataset" if kind == "dataset" else "")
        raise HubCacheError(
            f"{value} is no local path, and {kind} {value} (revision {revision}) is not in the "
            f"local Hugging Face cache (looked "
            f"in {repo}; HF_HUB_CACHE / HF_HOME set the cache); kseed never downloads: fetch it "
            f"where there is network with `{fetch} {value} --revision {revision}` (or `hf "
            f"download`) and copy the cache here")
    return os.path.abspath(snap)
