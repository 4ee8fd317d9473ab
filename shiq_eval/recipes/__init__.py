"""Recipes: thin experiments that compose the library's parts (data, training, evaluation) into one
run each: ``demo`` (``shiq-demo``, offline RL on SmolLM2), ``toys`` (``shiq-toys``, the paper's
bandit and grid world) and ``bfcl`` (``shiq-bfcl``, multi-turn BFCL-V3); ``common`` holds what they
share (config loading, resumable stages). The library never imports a recipe.
"""
