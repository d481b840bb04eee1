"""The hypothesis settings shared by the property tests (test_properties*.py).

DEMASK_FUZZ_EXAMPLES=N searches longer than the default suite's 15 examples per property.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("DEMASK_FUZZ_EXAMPLES", "15"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
