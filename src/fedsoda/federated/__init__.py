"""The only package that imports flwr: apps, round loop, messages, screening, checkpoints."""
