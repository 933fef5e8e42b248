"""The prepare stage, run in Ray CPU tasks before the replicas: a chunk's rows checked, rendered into
prompts (template, chat template, pairs: rows.py), fitted to the model's context (context.py) and
tokenized (tokens.py) into the prepared table the replicas read (chunk.py; its columns: settings.py)."""
