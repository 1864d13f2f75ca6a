"""Evaluation: methods x budgets x tasks at equal stored tokens, what `polykv eval` runs.

``runner`` scores every method on the tasks (``polykv.tasks``) through the harness, ``scoring``
turns losses into gap recovery with confidence intervals, ``report`` writes the table and plots.
"""
