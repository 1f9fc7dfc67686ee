"""Distillation alignment of the sub-LLM to the full LLM; never imports flwr."""
