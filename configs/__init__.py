"""The Hydra configs and data files of shiq, importable as ``shiq_configs`` once installed."""
