"""Accuracy (option log-likelihood, GSM8K exact match) and perplexity; never imports flwr."""
