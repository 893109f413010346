"""Shared pytest setup for the whole suite.

Registers the real test services of ``tests/services.py`` (``s3_server``, ``s3_bucket``,
``pushgateway``) for every test module, and a Hypothesis profile without per-example deadlines:
the suite runs on shared 2-core machines, where wall-clock deadlines only measure the neighbours.
Select another profile with ``--hypothesis-profile``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from services import pushgateway, s3_bucket, s3_server  # noqa: F401  (fixtures, registered by import)

settings.register_profile(
    "puzzle", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("puzzle")
