"""megatron-core trainer for ShiQ and its baselines."""

from shiq_train.deferred_compile import install as _install_deferred_compile

_install_deferred_compile()
