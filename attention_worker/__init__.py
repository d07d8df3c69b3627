"""Attention on the router: rotary embeddings, the KV cache it owns, and GQA / MLA attention.

A step's new tokens of several sequences arrive flattened in a `StepBatch`; attention writes their
keys (or MLA latents) into the sequences' cache slots and attends over each slot's cached tokens.
"""
