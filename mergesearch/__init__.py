"""mergesearch: search for the best merge of fine-tuned checkpoints."""

__version__ = "0.1.0"
