"""Calibration: measuring how much each layer loses under each policy and budget, kept as a profile."""
