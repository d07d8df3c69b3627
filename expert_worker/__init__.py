"""Expert worker: a stateless gRPC service that runs a shard of a model's routed experts.

The router dispatches, for each MoE layer, the tokens that chose this worker's experts; the worker
returns one weighted-sum row per token. Start one with `moe-expert-worker serve --model DIR ...`.
"""
