"""3-2-1 with a real S3 server (SeaweedFS, tests/s3server.py): ``copy`` directory → bucket → directory,
a copy killed half-way and resumed, and request economy (``list`` of 1,000 images in a bucket).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tests.disks import random_image
from tests.s3server import S3Server
from tests.support import MIB, cli, cli_env, cli_json
from tests.test_copy import PASS1, PASS2, stored_chunk_copies

from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_ZERO
from imgbackup.repository.repo import Repository

pytestmark = pytest.mark.slow   # each test 20-85 s on 2 shared cores (a real server, real round trips)


def _env(server: S3Server, **extra: str) -> dict[str, str]:
    return server.env(IMGBACKUP_S3_PROBE_CACHE="0", **extra)


def _keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def _open(url: str, passphrase: str, server: S3Server, monkeypatch) -> Repository:
    for key, value in _env(server).items():
        monkeypatch.setenv(key, value)
    return Repository.open(url, lambda: passphrase.encode())


@pytest.fixture
def local(tmp_path: Path) -> dict:
    """A directory repository with a full and an incremental image of one disk and a full of another."""
    repo = tmp_path / "local"
    cli_json("init", repo=repo, passphrase=PASS1)
    a = random_image(tmp_path / "a.img", 40 * MIB, seed=3, data_fraction=0.6)
    first = cli_json("backup", a, "--name", "a", repo=repo, passphrase=PASS1)
    content = {first["id"]: a.read_bytes()}
    with open(a, "r+b") as f:
        f.seek(17 * MIB)
        f.write(os.urandom(3 * MIB))
    second = cli_json("backup", a, "--name", "a", repo=repo, passphrase=PASS1)
    content[second["id"]] = a.read_bytes()
    b = random_image(tmp_path / "b.img", 6 * MIB, seed=4)
    third = cli_json("backup", b, "--name", "b", repo=repo, passphrase=PASS1)
    content[third["id"]] = b.read_bytes()
    return {"repo": repo, "content": content}


def test_copy_directory_to_bucket_to_directory_restores_every_image(s3_server, s3_bucket, local, tmp_path) -> None:
    env = _env(s3_server)
    bucket_url = f"s3://{s3_bucket}/offsite"
    # raw: the bucket is related to the local repository
    init = cli_json("init", "--related-to", local["repo"], repo=bucket_url, passphrase=PASS2,
                    IMGBACKUP_PASSPHRASE2=PASS1, **env)
    assert init["chunk_size"] == 1 << 20
    up = cli_json("copy", "--all", "--to", bucket_url, "--verify", repo=local["repo"], passphrase=PASS1,
                  IMGBACKUP_PASSPHRASE2=PASS2, **env)
    assert up["mode"] == "raw" and up["verified"] and len(up["images_copied"]) == 3
    assert up["destination_requests"]["http"] >= up["destination_requests"]["total"] > 0
    # re-encrypting: the second directory is unrelated to the bucket
    second = tmp_path / "second"
    cli_json("init", repo=second, passphrase=PASS1)
    down = cli_json("copy", "--all", "--to", second, "--verify", repo=bucket_url, passphrase=PASS2,
                    IMGBACKUP_PASSPHRASE2=PASS1, **env)
    assert down["mode"] == "re-encrypt" and down["verified"] and len(down["images_copied"]) == 3
    assert down["source_requests"]["http"] > 0
    for image_id, want in local["content"].items():
        for repo, passphrase in ((second, PASS1), (bucket_url, PASS2)):
            out = tmp_path / "out.img"
            proc = cli("restore", image_id, out, "--yes", repo=repo, passphrase=passphrase, **env)
            assert proc.returncode == 0, proc.stderr
            assert out.read_bytes() == want, (repo, image_id)
            out.unlink()
    for repo, passphrase in ((second, PASS1), (bucket_url, PASS2)):
        assert cli("verify", repo=repo, passphrase=passphrase, **env).returncode == 0
    again = cli_json("copy", "--all", "--to", bucket_url, repo=local["repo"], passphrase=PASS1,
                     IMGBACKUP_PASSPHRASE2=PASS2, **env)
    assert again["images_copied"] == [] and again["chunks_sent"] == 0 and len(again["images_skipped"]) == 3


@pytest.mark.parametrize("related", [True, False], ids=["raw", "re-encrypt"])
def test_a_copy_killed_half_way_resumes_without_sending_a_chunk_twice(s3_server, s3_bucket, tmp_path, related,
                                                                      monkeypatch) -> None:
    env = _env(s3_server)
    repo = tmp_path / "local"
    cli_json("init", repo=repo, passphrase=PASS1)
    content = {}
    for n in range(3):   # three images of 64 MiB, mostly new data each: 12 packs to send
        src = random_image(tmp_path / f"d{n}.img", 64 * MIB, seed=10 + n)
        content[cli_json("backup", src, "--name", f"d{n}", repo=repo, passphrase=PASS1)["id"]] = src.read_bytes()
        src.unlink()
    url = f"s3://{s3_bucket}/copy"
    extra = {"IMGBACKUP_PASSPHRASE2": PASS1} if related else {}
    cli_json("init", *(["--related-to", str(repo)] if related else []), repo=url, passphrase=PASS2, **extra, **env)
    run_env = cli_env(repo, PASS1, IMGBACKUP_PASSPHRASE2=PASS2, IMGBACKUP_COPY_INDEX_BYTES=str(40 * MIB),
                      IMGBACKUP_S3_PARALLEL_WRITES="1", **env)
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "copy", "--all", "--to", url, "--json"], env=run_env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while sum("/packs/" in k for k in _keys(s3_server, s3_bucket)) < 6:   # index files and an image landed
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the copy sent no packs"
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    keys = _keys(s3_server, s3_bucket)
    assert any("/index/" in k for k in keys)              # index files were written as packs landed
    assert sum("/images/" in k for k in keys) < 3          # and it was killed before the end
    assert cli("verify", repo=url, passphrase=PASS2, **env).returncode == 0   # what is there is valid
    dst = _open(url, PASS2, s3_server, monkeypatch)
    before, _ = stored_chunk_copies(dst)
    assert before > 0
    done = subprocess.run([sys.executable, "-m", "imgbackup", "copy", "--all", "--to", url, "--json", "--verify"],
                          env=run_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["verified"] and sorted(doc["images_copied"] + doc["images_skipped"]) == sorted(content)
    dst = _open(url, PASS2, s3_server, monkeypatch)
    copies, distinct = stored_chunk_copies(dst)
    assert copies == distinct, "a chunk was stored twice"
    assert distinct == before + doc["chunks_sent"]          # nothing stored before the kill was sent again
    needed = set().union(*(dst.images.load(i).unique_ids() for i in doc["images_copied"]))
    assert doc["chunks_sent"] + doc["chunks_reused"] == len(needed) and doc["chunks_sent"] < distinct
    for image_id, want in content.items():
        out = tmp_path / "out.img"
        proc = cli("restore", image_id, out, "--yes", repo=url, passphrase=PASS2, **env)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == want
        out.unlink()


def _many_images(repo: Repository, count: int) -> None:
    """``count`` small images written in-process (all-zero disks: a header and a one-slot body each)."""
    def one(n: int) -> None:
        meta = repo.new_image_meta(type="full", parent=None, name=f"host{n % 20}", slots=1,
                                   source={"path": f"/dev/disk{n}", "size": 1 << 20, "kind": "block",
                                           "logical_sector_size": 512, "physical_sector_size": 4096},
                                   used_map={"enabled": False, "regions": []}, changed_blocks=None)
        meta["created"] += n * 1e-3
        repo.images.write(ImageIndex(meta, np.array([SLOT_ZERO], np.uint8), np.zeros((0, 32), np.uint8),
                                     np.ones(1, np.uint8)))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def test_list_of_a_thousand_images_in_a_bucket_is_o1_requests_on_the_second_run(s3_server, s3_bucket, tmp_path,
                                                                                  monkeypatch) -> None:
    env = _env(s3_server, XDG_CACHE_HOME=str(tmp_path / "cache"))
    url = f"s3://{s3_bucket}/many"
    created = cli_json("init", repo=url, **env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IMGBACKUP_CACHE", "0")    # the writer here leaves the cache to the commands below
    _many_images(Repository.open(url, lambda: b"test-pass"), 1000)
    monkeypatch.delenv("IMGBACKUP_CACHE")

    def listing() -> dict:
        doc = cli_json("list", repo=url, timeout=600, **env)
        assert len(doc["images"]) == 1000 and all("error" not in row for row in doc["images"])
        return doc["requests"]

    cold = listing()
    assert cold["get_range"] == 1000                 # one ranged read per header (the head and header at once)
    assert cold.get("get", 0) >= 1000 and cold.get("size", 0) == 0, cold   # each body once; sizes from the GET
    warm = listing()
    # headers and bodies (list's stored/unique columns) all from the cache: what is left is config, key
    # file, catalog and the listings -- not one request per image
    print("cold", cold, "warm", warm)
    assert warm.get("get_range", 0) == 0 and warm.get("get", 0) <= 10 and warm.get("size", 0) == 0, warm
    assert warm.get("list", 0) <= 10 and warm["total"] <= 25, warm
    cache = tmp_path / "cache" / "imgbackup" / created["id"]
    headers = cache / "image-headers"
    damaged = bytearray(headers.read_bytes())
    damaged[8 + 20 + 10] ^= 0x40                     # inside the first entry's sealed header (magic, id, length)
    headers.write_bytes(bytes(damaged))
    again = listing()
    assert again["get_range"] == 1 and again["get"] == warm["get"], again   # that header alone fetched again
    assert listing()["total"] == warm["total"]       # ... and the cache file was rewritten whole
    body = sorted((cache / "image-bodies").iterdir())[500]
    damaged = bytearray(body.read_bytes())
    damaged[-5] ^= 0x01                              # inside the sealed body's tag: a real bit of a real file
    body.write_bytes(bytes(damaged))
    again = listing()
    assert again.get("get_range", 0) == 0 and again["get"] == warm["get"] + 1, again   # detected, refetched
    assert body.read_bytes() != bytes(damaged)       # and the entry rewritten
    assert listing()["total"] == warm["total"]
    headers.write_bytes(b"garbage")
    assert listing()["get_range"] == 1000            # a cache that does not parse is rebuilt
    assert listing()["total"] == warm["total"]
    info = cli_json("info", repo=url, timeout=600, **env)["requests"]
    assert info.get("size", 0) == 0 and info.get("get", 0) <= 10 and info["total"] <= 25, info   # no HEAD per object
