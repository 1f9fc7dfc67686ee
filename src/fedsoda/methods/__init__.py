"""One module per federated fine-tuning method, each stating its recipe top to bottom."""
