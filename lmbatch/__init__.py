"""lmbatch: batch LLM inference over Parquet with Ray Data and Hugging Face transformers."""

__version__ = "0.2.0"
