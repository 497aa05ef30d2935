"""Evaluation: metrics, base-vs-tuned comparison with bootstrap intervals, forgetting check, reports.

    gemcut eval runs/<name>        gemcut compare runs/a runs/b
"""
