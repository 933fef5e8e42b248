"""What a job tells as it runs and when it ends: the progress line and live counts (progress.py), the
summary and its figures (summary.py), and samplers of a figure over time (samplers.py).
"""
