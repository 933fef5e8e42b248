"""The output stage: the output directory and its commit protocol, the lease of a run, the output columns."""
