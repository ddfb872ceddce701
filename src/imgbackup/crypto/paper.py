"""The paper recovery sheet (FORMAT.md 2.4): a key bundle as numbered, checked base32 lines and a QR text.

A sysadmin types the sheet back years later, from paper, under stress. Each line carries its own
CRC-20, so a mistyped character is found at once and the message names its line; a CRC (not a
truncated hash) because it is *certain* to catch every single-character typo, two swapped
neighbours, and a line typed under another line's number. Pure functions: the only I/O is
``qr_png``, which writes the file it is told to (mode 0600: the sheet is the whole key).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

from imgbackup.errors import BadPaperKey, TargetRefused
from imgbackup.format.layout import KEY_BUNDLE_HEAD, KEY_BUNDLE_MAGIC, KEY_GENERATION, MAX_GENERATIONS

LINE_BYTES = 20          # 32 base32 characters: 8 groups of 4, short enough to type without losing the place
GROUP = 4
CHECK_CHARS = 4          # 20 bits of CRC: 1 in a million random lines pass by chance
CRC_POLY = 0x00009       # x^20 + x^3 + 1, primitive: every burst of <= 20 bits changes the CRC
CRC_BITS = 20
QR_PREFIX = "IMGBKEY1:"
QR_CHECK_CHARS = 8       # 5 bytes of SHA-256 over the whole bundle
# Version 40 at error correction M holds 3391 alphanumeric characters: a bundle of up to 20 generations.
# M (15 % of the code may be damaged) suits paper that gets folded and faded.
QR_MAX_TEXT = 3391
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Characters that are no base32 digit but are what a typist reads for one.
_LOOKALIKES = str.maketrans({"0": "O", "1": "I", "8": "B"})
_NUMBERED = re.compile(r"^\s*(\d+)(?:[\s.:)]+|$)(.*)$")
_HINT = "type that line again from the sheet, character by character"


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        reg = byte << (CRC_BITS - 8)
        for _ in range(8):
            reg = ((reg << 1) ^ CRC_POLY) if reg & (1 << (CRC_BITS - 1)) else reg << 1
        table.append(reg & ((1 << CRC_BITS) - 1))
    return table


_CRC_TABLE = _crc_table()


def crc20(data: bytes) -> int:
    """CRC-20, polynomial x^20+x^3+1, initial value 0, bits most significant first, no final XOR."""
    reg = 0
    mask = (1 << CRC_BITS) - 1
    for byte in data:
        reg = ((reg << 8) & mask) ^ _CRC_TABLE[((reg >> (CRC_BITS - 8)) ^ byte) & 0xFF]
    return reg


def line_check(number: int, chunk: bytes) -> str:
    """The 4 base32 characters that end line ``number`` (1-based) holding ``chunk``."""
    value = crc20(number.to_bytes(2, "little") + chunk)
    return "".join(ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(CHECK_CHARS)))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def paper_lines(bundle: bytes) -> list[str]:
    """The sheet's numbered lines: ``NN  XXXX … XXXX  CCCC`` (20 bytes each; the last may be shorter)."""
    if not bundle or len(bundle) % 5 or len(bundle) // LINE_BYTES >= 1 << 16:
        raise ValueError("a paper sheet holds a key bundle of a multiple of 5 bytes")
    count = -(-len(bundle) // LINE_BYTES)
    width = max(2, len(str(count)))
    lines = []
    for index in range(count):
        chunk = bundle[index * LINE_BYTES:(index + 1) * LINE_BYTES]
        text = _b32(chunk)
        groups = " ".join(text[i:i + GROUP] for i in range(0, len(text), GROUP))
        lines.append(f"{index + 1:0{width}d}  {groups}  {line_check(index + 1, chunk)}")
    return lines


def paper_sheet(bundle: bytes, repository: str, created: str) -> str:
    """The whole printable sheet: a header, the lines, the QR text. No header line starts with a digit."""
    generations = int.from_bytes(bundle[10:12], "little") if len(bundle) >= 12 else 0
    head = [f"imgbackup recovery sheet - repository {repository}",
            f"Printed {created}; key generations: {generations}. This sheet IS the repository's full key.",
            "Keep it printed, in a safe or a sealed envelope off-site; never photograph it, never keep it",
            "beside the backups. Restore access: imgbackup key import --paper FILE (or type the lines).", ""]
    return "\n".join([*head, *paper_lines(bundle), "", f"QR text: {paper_qr_text(bundle)}", ""])


def _parse_lines(text: str) -> dict[int, str]:
    """Numbered lines -> their characters (spaces removed, upper case, look-alikes mapped)."""
    found: dict[int, str] = {}
    for raw in text.splitlines():
        split = _split_numbered(raw)
        if split is None:
            continue
        number, chars = split
        if number in found:
            raise BadPaperKey(f"the recovery sheet has line {number} twice", "keep one copy of each line")
        found[number] = chars.upper().translate(_LOOKALIKES)
    return found


def _split_numbered(raw: str) -> tuple[int, str] | None:
    """A line's number and its characters (spaces removed), or None for a line without a number.

    Typed without a space after the number (``03OABC…``, the data starting with a look-alike digit),
    a full line's number is what precedes its last 36 characters."""
    match = _NUMBERED.match(raw)
    if match:
        number, rest = match.group(1), "".join(match.group(2).split())
    else:
        compact = "".join(raw.split())
        full = LINE_BYTES * 8 // 5 + CHECK_CHARS
        if not compact[:1].isdigit():
            return None
        if len(compact) > full and compact[:-full].isdigit():
            number, rest = compact[:-full], compact[-full:]
        else:
            digits = len(compact) - len(compact.lstrip("0123456789"))
            number, rest = compact[:digits], compact[digits:]
    return (int(number), rest) if int(number) > 0 else None


def _decode_line(number: int, chars: str, expected_bytes: int) -> bytes:
    want = expected_bytes * 8 // 5 + CHECK_CHARS
    if len(chars) != want:
        raise BadPaperKey(f"recovery sheet line {number} has {len(chars)} characters, expected {want} "
                          f"({want - CHECK_CHARS} + a {CHECK_CHARS}-character check)", _HINT)
    bad = next((c for c in chars if c not in ALPHABET), None)
    if bad is not None:
        raise BadPaperKey(f"recovery sheet line {number} has {bad!r}, which is no base32 character "
                          "(A-Z, 2-7)", _HINT)
    chunk = _unb32(chars[:-CHECK_CHARS])
    if line_check(number, chunk) != chars[-CHECK_CHARS:]:
        raise BadPaperKey(f"recovery sheet line {number} is mistyped (its check does not match)", _HINT)
    return chunk


def _bundle_size(first: bytes) -> int:
    if first[:len(KEY_BUNDLE_MAGIC)] != KEY_BUNDLE_MAGIC:
        raise BadPaperKey("recovery sheet line 1 does not start an imgbackup key (wrong sheet?)")
    generations = int.from_bytes(first[10:12], "little")
    if not 1 <= generations <= MAX_GENERATIONS:
        raise BadPaperKey("recovery sheet line 1 holds a damaged key header", _HINT)
    return KEY_BUNDLE_HEAD.size + generations * KEY_GENERATION.size


def read_paper(text: str) -> bytes:
    """The key bundle from a typed sheet (or from its QR text); BadPaperKey names the first bad line.

    Numbered lines win over a QR text in the same input: they are what a person typed and checks."""
    lines = _parse_lines(text)
    if not lines and QR_PREFIX in "".join(text.split()).upper():
        return read_paper_qr(text)
    if 1 not in lines:
        raise BadPaperKey("no recovery sheet line 1 found (each line starts with its number)",
                          "give the whole sheet, numbered lines as printed")
    size = _bundle_size(_decode_line(1, lines[1], LINE_BYTES))
    count = -(-size // LINE_BYTES)
    extra = [n for n in lines if n > count]
    chunks = []
    for number in range(1, count + 1):
        if number not in lines:
            raise BadPaperKey(f"the recovery sheet is missing line {number} of {count}", "type every line")
        chunks.append(_decode_line(number, lines[number], min(LINE_BYTES, size - (number - 1) * LINE_BYTES)))
    if extra:
        raise BadPaperKey(f"the recovery sheet has line {min(extra)}, but this key has only {count} lines",
                          "remove the lines that do not belong to this sheet")
    return b"".join(chunks)


def _qr_check(bundle: bytes) -> str:
    return _b32(hashlib.sha256(b"imgbackup-paper\0" + bundle).digest()[:5])


def paper_qr_text(bundle: bytes) -> str:
    """``IMGBKEY1:<bundle in base32>:<8 check characters>``, all in QR's alphanumeric set."""
    return f"{QR_PREFIX}{_b32(bundle)}:{_qr_check(bundle)}"


def qr_fits(text: str) -> bool:
    """Whether ``text`` fits one QR code (version 40, error correction M)."""
    return len(text) <= QR_MAX_TEXT


def read_paper_qr(text: str) -> bytes:
    """The key bundle from a scanned ``IMGBKEY1:`` text (spaces, case and line breaks ignored)."""
    joined = "".join(text.split()).upper()
    start = joined.find(QR_PREFIX)
    parts = joined[start + len(QR_PREFIX):].split(":") if start >= 0 else []
    if len(parts) != 2 or len(parts[1]) != QR_CHECK_CHARS:
        raise BadPaperKey("the QR text is not an imgbackup key (it must read IMGBKEY1:…:…)",
                          "scan the sheet's QR code again, or type its numbered lines")
    body = parts[0].translate(_LOOKALIKES)
    if len(body) % 8 or any(c not in ALPHABET for c in body):
        raise BadPaperKey("the QR text is damaged (not base32)", "scan again, or type the numbered lines")
    bundle = _unb32(body)
    if _qr_check(bundle) != parts[1].translate(_LOOKALIKES):
        raise BadPaperKey("the QR text is damaged (its check does not match)",
                          "scan again, or type the numbered lines")
    if len(bundle) < LINE_BYTES or _bundle_size(bundle[:LINE_BYTES]) != len(bundle):
        raise BadPaperKey("the QR text holds a key of the wrong length", "scan again, or type the numbered lines")
    return bundle


def _qr_matrix(text: str) -> list[list[bool]]:
    import qrcode  # imported here: ~0.1 s, and only `key export --paper` draws codes
    from qrcode.constants import ERROR_CORRECT_M

    if not qr_fits(text):
        raise ValueError(f"{len(text)} characters do not fit one QR code (at most {QR_MAX_TEXT})")
    code = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=4)
    code.add_data(text)
    code.make(fit=True)
    return code.get_matrix()


def qr_terminal(text: str, dark_background: bool = True) -> str:
    """The QR code as Unicode half blocks, two module rows per text line (quiet zone included).

    On a dark terminal the light modules are drawn (``dark_background``); on paper or a light
    terminal the dark ones."""
    matrix = _qr_matrix(text)
    if len(matrix) % 2:
        matrix = [*matrix, [False] * len(matrix[0])]
    drawn = (lambda dark: not dark) if dark_background else (lambda dark: dark)
    glyph = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}
    rows = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        rows.append("".join(glyph[drawn(a), drawn(b)] for a, b in zip(top, bottom, strict=True)))
    return "\n".join(rows) + "\n"


def qr_png(text: str, path: str | os.PathLike, scale: int = 8) -> None:
    """Write the QR code as a PNG (pure Python: pypng, no pillow), created 0600 and never over a file."""
    import png  # pypng, a dependency of qrcode[png]; imported only here

    matrix = _qr_matrix(text)
    rows = [[0 if dark else 255 for dark in row for _ in range(scale)] for row in matrix for _ in range(scale)]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TargetRefused(f"{path} exists; the QR code is not written over it", "name a new file") from None
    with os.fdopen(fd, "wb") as out:
        png.Writer(len(rows[0]), len(rows), greyscale=True, bitdepth=8).write(out, rows)
