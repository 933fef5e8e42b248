"""The benchmarks (jobs/benchmark.py: lmbatch against the alternatives, side by side, as ratios;
jobs/scale.py: the pipeline's own cost at growing row counts). Nothing in the product imports this
package.
"""
