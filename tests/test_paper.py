"""The paper recovery sheet (FORMAT.md 2.4): typed back with typos, swaps, look-alikes; its QR code scanned.

The QR codes are decoded by zbar (apt zbar-tools), a real scanner's library, from the PNG we write
and from the terminal drawing turned back into pixels.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess

import png
import pytest

from imgbackup.crypto.keys import KeyBundle
from imgbackup.crypto.paper import (
    ALPHABET,
    crc20,
    line_check,
    paper_lines,
    paper_qr_text,
    paper_sheet,
    qr_fits,
    qr_png,
    qr_terminal,
    read_paper,
    read_paper_qr,
)
from imgbackup.errors import EXIT_CODES, BadPaperKey, ImgBackupError, TargetRefused
from support import need


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return KeyBundle.generate(os.urandom(16)).to_bytes()


@pytest.fixture(scope="module")
def rotated() -> bytes:
    key = KeyBundle.generate(os.urandom(16))
    for _ in range(3):
        key = key.rotated()
    return key.to_bytes()


def _fields(line: str) -> tuple[str, str]:
    """A printed line's number and its characters (data + check, spaces removed)."""
    number, rest = line.split(None, 1)
    return number, "".join(rest.split())


def _with(lines: list[str], index: int, chars: str) -> str:
    out = list(lines)
    out[index] = f"{index + 1:02d}  {chars}"
    return "\n".join(out)


def test_round_trip_of_a_real_bundle(bundle: bytes, rotated: bytes) -> None:
    for raw in (bundle, rotated):
        sheet = paper_sheet(raw, "0123abcd", "2026-12-01 17:00 UTC")
        assert read_paper(sheet) == raw
        assert KeyBundle.from_bytes(read_paper(sheet)).to_bytes() == raw
    lines = paper_lines(bundle)
    assert len(lines) == len(bundle) // 20 == 8
    for number, line in enumerate(lines, 1):
        head, *groups, check = line.split()
        assert head == f"{number:02d}" and len(groups) == 8 and all(len(g) == 4 for g in groups)
        assert check == line_check(number, bundle[(number - 1) * 20:number * 20])


def test_crc20_is_the_documented_polynomial() -> None:
    # Bit-by-bit reference of FORMAT.md 2.4: x^20 + x^3 + 1, init 0, MSB first, no final XOR.
    def reference(data: bytes) -> int:
        reg = 0
        for byte in data:
            for bit in range(7, -1, -1):
                top = (reg >> 19) & 1
                reg = (reg << 1) & 0xFFFFF
                if top ^ ((byte >> bit) & 1):
                    reg ^= 0x00009
        return reg

    rng = random.Random(15)
    for size in (0, 1, 2, 22, 100):
        data = rng.randbytes(size)
        assert crc20(data) == reference(data)
    # FORMAT.md's test vectors
    assert crc20(b"\x00" * 10) == 0 and crc20(b"\x80") == 0x00480
    assert crc20(bytes.fromhex("0100494D47424B455953")) == 0x83B9E
    assert line_check(1, b"IMGBKEYS") == "QO46"


def test_every_single_character_typo_is_caught_at_its_line(bundle: bytes) -> None:
    lines = paper_lines(bundle)
    caught = 0
    for index, line in enumerate(lines):
        _, chars = _fields(line)
        for pos, original in enumerate(chars):
            for typo in ALPHABET + "9@":
                if typo == original:
                    continue
                with pytest.raises(BadPaperKey, match=f"line {index + 1} ") as err:
                    read_paper(_with(lines, index, chars[:pos] + typo + chars[pos + 1:]))
                assert err.value.exit_code == 4 and "\n" not in str(err.value)
                caught += 1
    assert caught == len(lines) * 36 * 33


def test_dropped_or_doubled_character_and_swapped_neighbours_are_caught(bundle: bytes) -> None:
    lines = paper_lines(bundle)
    for index, line in enumerate(lines):
        _, chars = _fields(line)
        for pos in range(len(chars) - 1):
            swapped = chars[:pos] + chars[pos + 1] + chars[pos] + chars[pos + 2:]
            if swapped != chars:
                with pytest.raises(BadPaperKey, match=f"line {index + 1} is mistyped"):
                    read_paper(_with(lines, index, swapped))
            with pytest.raises(BadPaperKey, match=f"line {index + 1} has 35 characters"):
                read_paper(_with(lines, index, chars[:pos] + chars[pos + 1:]))
            with pytest.raises(BadPaperKey, match=f"line {index + 1} has 37 characters"):
                read_paper(_with(lines, index, chars[:pos] + chars[pos] + chars[pos:]))


def test_a_swapped_pair_of_lines_is_caught(bundle: bytes) -> None:
    lines = paper_lines(bundle)
    for a in range(len(lines)):
        for b in range(a + 1, len(lines)):
            # the lines' contents typed under each other's numbers, checks and all
            swapped = list(lines)
            swapped[a], swapped[b] = f"{a + 1:02d}{lines[b][2:]}", f"{b + 1:02d}{lines[a][2:]}"
            with pytest.raises(BadPaperKey, match=f"line {a + 1} is mistyped"):
                read_paper("\n".join(swapped))
    # whole numbered lines in another order are still the same key: the numbers say where each belongs
    shuffled = list(lines)
    random.Random(3).shuffle(shuffled)
    assert read_paper("\n".join(shuffled)) == bundle


def test_lowercase_spaces_and_lookalike_digits_are_accepted(bundle: bytes, rotated: bytes) -> None:
    for raw in (bundle, rotated):
        lines = paper_lines(raw)
        typed = []
        for line in lines:
            number, chars = _fields(line)
            chars = chars.replace("O", "0").replace("I", "1").replace("B", "8").lower()
            typed.append("  " + number + "   " + "  ".join(chars[i:i + 3] for i in range(0, len(chars), 3)) + " \t")
        text = "my notes\n\n" + "\n\n".join(typed) + "\nend of sheet\n"
        assert read_paper(text) == raw
        # and with no space at all, not even after the number
        assert read_paper("\n".join(n + c for n, c in map(_fields, lines))) == raw


def test_a_truncated_or_padded_sheet_is_refused(bundle: bytes, rotated: bytes) -> None:
    lines = paper_lines(rotated)
    assert len(lines) == 23
    with pytest.raises(BadPaperKey, match="missing line 23 of 23"):
        read_paper("\n".join(lines[:-1]))
    with pytest.raises(BadPaperKey, match="missing line 9 of 23"):
        read_paper("\n".join(lines[:8] + lines[9:]))
    with pytest.raises(BadPaperKey, match="line 1 found"):
        read_paper("\n".join(lines[1:]))
    with pytest.raises(BadPaperKey, match="no recovery sheet line 1"):
        read_paper("")
    with pytest.raises(BadPaperKey, match="line 9, but this key has only 8 lines"):
        read_paper("\n".join(paper_lines(bundle) + [lines[8]]))
    with pytest.raises(BadPaperKey, match="line 3 twice"):
        read_paper("\n".join(paper_lines(bundle) + [paper_lines(bundle)[2]]))
    # a half-typed last line
    number, chars = _fields(lines[-1])
    with pytest.raises(BadPaperKey, match="line 23 has 20 characters, expected 36"):
        read_paper("\n".join([*lines[:-1], f"{number} {chars[:20]}"]))


def test_a_sheet_of_something_else_is_refused() -> None:
    other = os.urandom(160)
    with pytest.raises(BadPaperKey, match="line 1 does not start an imgbackup key"):
        read_paper("\n".join(paper_lines(other)))


def test_qr_text_round_trip_and_damage(bundle: bytes, rotated: bytes) -> None:
    for raw in (bundle, rotated):
        text = paper_qr_text(raw)
        assert text.startswith("IMGBKEY1:") and set(text) <= set(ALPHABET + ":0123456789")
        assert qr_fits(text)
        assert read_paper_qr(text) == raw
        assert read_paper(f"scanned:\n{text.lower()}\n") == raw
    text = paper_qr_text(bundle)
    body = text.index(":") + 1
    for pos in (body, body + 100, len(text) - 1):
        damaged = text[:pos] + ("A" if text[pos] != "A" else "C") + text[pos + 1:]
        with pytest.raises(BadPaperKey, match="QR text is damaged"):
            read_paper_qr(damaged)
    with pytest.raises(BadPaperKey, match="not an imgbackup key"):
        read_paper_qr("IMGBKEY1:" + text[body:].split(":")[0])
    too_big = KeyBundle.generate(os.urandom(16))
    for _ in range(25):
        too_big = too_big.rotated()
    assert not qr_fits(paper_qr_text(too_big.to_bytes()))
    with pytest.raises(ValueError, match="do not fit one QR code"):
        qr_terminal(paper_qr_text(too_big.to_bytes()))


def _zbar(path) -> str:
    need(shutil.which("zbarimg") is not None, "zbarimg (apt zbar-tools) decodes the QR codes")
    done = subprocess.run(["zbarimg", "--raw", "-q", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_qr_png_scans_back(bundle: bytes, rotated: bytes, tmp_path) -> None:
    for name, raw in (("one", bundle), ("four", rotated)):
        path = tmp_path / f"{name}.png"
        qr_png(paper_qr_text(raw), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_paper(_zbar(path)) == raw
    with pytest.raises(TargetRefused, match="exists"):
        qr_png(paper_qr_text(bundle), tmp_path / "one.png")


def test_qr_terminal_drawing_scans_back(bundle: bytes, tmp_path) -> None:
    for dark_background in (True, False):
        drawing = qr_terminal(paper_qr_text(bundle), dark_background=dark_background)
        rows = drawing.rstrip("\n").split("\n")
        assert len({len(r) for r in rows}) == 1 and set(drawing) <= set(" \u2580\u2584\u2588\n")
        # back to pixels: each character is one module wide and two high; drawn = light on a dark terminal
        top = {" ": False, "\u2580": True, "\u2584": False, "\u2588": True}
        bottom = {" ": False, "\u2580": False, "\u2584": True, "\u2588": True}
        modules = [[m[c] for c in row] for row in rows for m in (top, bottom)]
        dark = [[not d if dark_background else d for d in row] for row in modules]
        pixels = [[0 if d else 255 for d in row for _ in range(6)] for row in dark for _ in range(6)]
        path = tmp_path / f"terminal-{dark_background}.png"
        with open(path, "wb") as out:
            png.Writer(len(pixels[0]), len(pixels), greyscale=True).write(out, pixels)
        assert read_paper_qr(_zbar(path)) == bundle


def test_bad_paper_key_has_a_documented_exit_code() -> None:
    assert BadPaperKey.exit_code in dict(EXIT_CODES)


def test_a_repository_opened_with_only_the_paper_sheet_restores_byte_exact(tmp_path, monkeypatch) -> None:
    """Every key slot lost: the typed sheet opens the repository, gets a new passphrase, restores."""
    from imgbackup.repository.keyslots import import_paper
    from imgbackup.repository.repo import Repository
    from support import cli, sha256_file

    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    repo, source = tmp_path / "repo", tmp_path / "disk.img"
    source.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    for args in (("init", "-r", repo), ("backup", "-r", repo, source)):
        done = cli(*args, **state)
        assert done.returncode == 0, done.stderr
    monkeypatch.setenv("IMGBACKUP_TEST_CHEAP_KDF", "1")
    sheet = paper_sheet(Repository.open(repo, lambda: b"test-pass").keys.to_bytes(), "test", "today")
    for slot in (repo / "keys").iterdir():
        slot.unlink()
    lost = cli("restore", "-r", repo, "latest", tmp_path / "nope.img", "--yes", **state)
    assert lost.returncode != 0 and not (tmp_path / "nope.img").exists()

    lines = sheet.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("05 "))
    typo = lines[at][:4] + ("A" if lines[at][4] != "A" else "C") + lines[at][5:]
    with pytest.raises(BadPaperKey, match="line 5 is mistyped"):
        read_paper("\n".join([*lines[:at], typo, *lines[at + 1:]]))
    other = KeyBundle.generate(os.urandom(16)).to_bytes()
    with pytest.raises(ImgBackupError, match="another repository"):
        Repository.open_with_bundle(repo, KeyBundle.from_bytes(read_paper(paper_sheet(other, "x", "y"))))
    (tmp_path / "foreign.txt").write_text(paper_sheet(other, "x", "y"))
    foreign = cli("key", "import", "-r", repo, "--paper", tmp_path / "foreign.txt", **state)
    assert foreign.returncode == 4 and "another repository" in foreign.stderr, foreign.stderr   # a wrong key
    assert "Traceback" not in foreign.stderr and len(foreign.stderr.strip().splitlines()) == 1

    opened = Repository.open_with_bundle(repo, KeyBundle.from_bytes(read_paper(sheet.lower())))
    import_paper(opened, b"new-pass", "paper")
    target = tmp_path / "restored.img"
    done = cli("restore", "-r", repo, "latest", target, "--yes", passphrase="new-pass", **state)
    assert done.returncode == 0, done.stderr
    assert sha256_file(target) == sha256_file(source)


def test_qrcode_is_imported_only_to_draw() -> None:
    import sys

    program = ("import os, sys; from imgbackup.crypto.keys import KeyBundle; import imgbackup.crypto.paper as p; "
               "raw = KeyBundle.generate(os.urandom(16)).to_bytes(); assert p.read_paper(p.paper_sheet(raw, 'r', 'd')) "
               "== raw; print('qrcode' in sys.modules, 'png' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
