import os
import time

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["rescue_fixtures"]  # the session-wide rescue media of the guest tests

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Cheap KDF parameters for repositories created by tests; recorded in each key file.
os.environ.setdefault("IMGBACKUP_TEST_CHEAP_KDF", "1")


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a loop device or mount of this session behind."""
    from tests.test_mount_helpers import system_state

    before = system_state()
    yield
    for _ in range(20):
        if system_state() == before:
            break
        time.sleep(0.1)
    assert system_state() == before, "a loop device or mount was left behind"
