"""Shared test settings: seeded hypothesis profiles (CI runs >= 1000 examples per property)."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=1000, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
