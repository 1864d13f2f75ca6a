"""Profiles: what calibration measured of one model, kept on disk and read by resolution."""

from polykv.profile.profile import (
    DEFAULT_HEAD_PROFILES,
    DEFAULT_PROFILE,
    DEFAULT_PROFILES,
    Profile,
    ProfileError,
    TunedRegime,
    as_profile,
    default_profile,
    fingerprint,
)

__all__ = [
    "DEFAULT_HEAD_PROFILES",
    "DEFAULT_PROFILE",
    "DEFAULT_PROFILES",
    "Profile",
    "ProfileError",
    "TunedRegime",
    "as_profile",
    "default_profile",
    "fingerprint",
]
