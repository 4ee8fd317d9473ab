"""Recipes: thin experiments that compose the library's parts (data, training, evaluation) into one
run each: ``demo`` (``shiq-demo``, offline RL on SmolLM2) and ``toys`` (``shiq-toys``, the paper's
bandit and grid world). The library never imports a recipe.
"""
