"""Router: the dense part of an MoE model (embeddings, attention, gating, shared experts, LM head),
sampling and continuous batching; routed experts run on expert workers behind an expert backend.
"""
