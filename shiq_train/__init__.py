"""megatron-core trainer for ShiQ and its baselines."""
