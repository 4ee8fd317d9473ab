"""megatron-core trainer for ShiQ and its baselines."""

from pathlib import Path


def config_dir() -> Path:
    """The ``configs/`` folder: Hydra configs, the demo's embedded default, the BFCL split.

    Installed as the package ``shiq_configs`` (editable or not); a source tree that is not installed
    falls back to ``configs/`` next to this package.
    """
    import importlib.util

    spec = importlib.util.find_spec("shiq_configs")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return Path(__file__).resolve().parents[1] / "configs"
