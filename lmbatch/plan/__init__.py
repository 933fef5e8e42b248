"""The plan stage: everything checked before Ray starts or a model loads, so that a bad job stops here with
one line: the job plan (job.py) and its fingerprint (fingerprint.py), the model and tokenizer
(model_checks.py, prompt_checks.py, encoder_notes.py), the cluster's resources (resources.py), and the
dry run (dry_run.py).
"""
