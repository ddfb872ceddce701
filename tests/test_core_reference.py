"""IMGBACKUP_CORE=reference: the whole process runs on the pure-Python kernels, with the same results.

Under ``-m core_reference`` with IMGBACKUP_CORE=reference (scripts/test.sh) the engine tests run on
reference.py; these tests check that the switch really swaps the kernels, and that a repository
cannot tell which core wrote it: the same source gives the same chunk ids either way.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from tests.support import MIB, cli, cli_json

from imgbackup.repository.repo import Repository

CHECK = """
import imgbackup._core as core
from imgbackup._core import bitmap, reference, scan
from imgbackup._core.bitmap import set_range
import imgbackup._core.scan as scan_module
print(core._CORE, scan is reference, bitmap is reference, set_range is reference.set_range,
      scan_module is reference)
"""


def _core_run(mode: str) -> str:
    env = dict(os.environ, IMGBACKUP_CORE=mode)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.split()


def test_the_switch_swaps_every_way_of_importing_a_kernel() -> None:
    assert _core_run("reference") == ["reference", "True", "True", "True", "True"]
    assert _core_run("native") == ["native", "False", "False", "False", "False"]


def test_an_unknown_core_is_one_line() -> None:
    proc = cli("--version", IMGBACKUP_CORE="fast")
    assert proc.returncode == 1
    assert proc.stderr == "imgbackup: error: IMGBACKUP_CORE must be 'native' or 'reference', not 'fast'\n"


def test_both_cores_write_the_same_chunks(tmp_path: Path) -> None:
    """A backup on each core of the same source: the same ids, kinds and digest, and it restores."""
    rng = random.Random(11)
    data = bytearray(rng.randbytes(6 * MIB))
    data[2 * MIB:3 * MIB + 4096] = bytes(MIB + 4096)
    source = tmp_path / "src.img"
    source.write_bytes(data)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    native = cli_json("backup", source, "--name", "native", repo=repo, IMGBACKUP_CORE="native")["id"]
    ref = cli_json("backup", source, "--name", "reference", repo=repo, IMGBACKUP_CORE="reference")["id"]
    images = Repository.open(repo, lambda: b"test-pass").images
    a, b = images.load(native), images.load(ref)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.kinds, b.kinds)
    assert a.meta["content_digest"] == b.meta["content_digest"]
    out = tmp_path / "restored.img"
    assert cli("restore", ref, out, "--yes", repo=repo, IMGBACKUP_CORE="reference").returncode == 0
    assert out.read_bytes() == bytes(data)
