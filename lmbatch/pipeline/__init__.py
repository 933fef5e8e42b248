"""The Ray Data wiring of the stages, `run(cfg)` (run.py): the Ray session and how a run stops
(session.py), the dataset of chunks through prepare tasks and replica actors (dataset.py), the commit of
the output (commit.py) and what a run says before it generates (notices.py). Nothing imports this
package but the entrypoints and the benchmarks.
"""
