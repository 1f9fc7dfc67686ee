"""Data sets, task formatting and client partitions; never imports flwr."""
