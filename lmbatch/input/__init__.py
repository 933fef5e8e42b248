"""The input stage: find the Parquet files and check them from their footers (files.py), scan a column
of them (scans.py), cut the rows into chunks and read a chunk back (chunks.py), and the built-in inputs
(builtin.py). Nothing here imports torch or loads a model."""
