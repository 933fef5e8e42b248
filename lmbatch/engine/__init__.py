"""The engines behind one small interface (types.py: Request, Completion, SamplingParams, EngineStats):
hf.py runs transformers on length-bucketed micro-batches that the pure planner (batching.py) cuts,
with loading, shared prefixes, scoring and pooling (embeddings, classification) beside it; echo.py
runs no model and measures the pipeline alone."""
