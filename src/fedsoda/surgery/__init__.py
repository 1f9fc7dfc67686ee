"""Model surgery: layer similarity, pruning plans, sub-LLMs, NF4, LoRA, plug-back.

Never imports flwr.
"""
