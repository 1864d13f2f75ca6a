"""Calibration profiles that ship with polykv (JSON data; see ``polykv.profile.default_profile``)."""
