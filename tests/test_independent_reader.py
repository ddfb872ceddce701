"""The real proof that docs/FORMAT.md is exact (issue 9 §7): tests/independent_reader.py, written from
the spec alone, restores byte for byte what ``imgbackup restore`` writes — for an encrypted and an
unencrypted repository, full and incremental images, with delta chunks present.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from tests.malformed import build_base
from tests.support import cli, cli_env

READER = Path(__file__).with_name("independent_reader.py")
ALLOWED_IMPORTS = {"__future__", "base64", "hashlib", "hmac", "json", "math", "os", "struct", "sys", "pathlib",
                   "blake3", "zstandard", "cryptography"}


def _reader(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(READER), *map(str, args)], env=cli_env(),
                          capture_output=True, text=True, timeout=300, check=True)


def test_the_reader_uses_only_the_spec_and_public_libraries() -> None:
    tree = ast.parse(READER.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= ALLOWED_IMPORTS, modules


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_independent_reader_restores_what_imgbackup_restores(tmp_path_factory, encryption: str) -> None:
    root = tmp_path_factory.mktemp(f"reader-{encryption}")
    base = build_base(root, encryption)
    repo = base["repo"]
    assert int(_reader("deltas", repo).stdout) > 0, "the repository must hold delta chunks"
    listed = {line.split()[0]: line.split()[2] for line in _reader("list", repo).stdout.splitlines()}
    assert listed == {base["full"]: "full", base["incremental"]: "incremental"}
    for image_id in (base["full"], base["incremental"]):
        ours, theirs = root / f"{image_id}.imgbackup", root / f"{image_id}.independent"
        proc = cli("restore", image_id, ours, repo=repo)
        assert proc.returncode == 0, proc.stderr
        _reader("restore", repo, image_id, theirs)
        exact = theirs.read_bytes() == ours.read_bytes() == base["bytes"][image_id]   # a bool: no diff of MiBs
        assert exact, f"image {image_id}: the independent reader wrote other bytes than imgbackup restore"
