"""An image's header (JSON metadata), parsed without numpy: ``list`` reads only headers.

Kept apart from ``imageindex`` so that commands that never touch a body do not import numpy
(~0.25 s of every such run when cold).
"""

from __future__ import annotations

import json

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format.layout import FORMAT_VERSION


def parse_header(raw: bytes, image_id: str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"image {image_id}: header is not valid JSON") from None
    if meta.get("version") != FORMAT_VERSION:
        raise UnsupportedFormat(f"image {image_id} has unsupported version {meta.get('version')}")
    if meta.get("id") != image_id:
        raise IntegrityError(f"image {image_id}: header names another image ({meta.get('id')})")
    return meta
