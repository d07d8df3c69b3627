"""Shared pieces of moe-cluster: model specs and checkpoints, FP8 quantization, token formats."""
