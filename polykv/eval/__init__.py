"""Evaluation: tasks generated offline, their scores, and the runner behind `polykv eval`.

``text`` finds real prose on every machine (Python's own documentation strings), ``tasks`` builds
prompts from it (retrieval in RULER's style, and plain continuation), ``scoring`` scores answers
and next-token distributions, ``runner`` runs methods x budgets x tasks, ``report`` writes the table
and plots.
"""
