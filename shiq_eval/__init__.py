"""Evaluation of trained policies, and the recipes that run whole experiments."""

from shiq_train.deferred_compile import install as _install_deferred_compile

_install_deferred_compile()
