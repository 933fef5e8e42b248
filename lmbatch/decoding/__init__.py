"""How the hf engine steers transformers' generate, row by row: logits processors (sampling, choices,
penalties, patterns: processors.py), stop strings (stopping.py), structured output's patterns and
their indexes over the vocabulary (structured.py) and token log-probabilities (logprobs.py)."""
