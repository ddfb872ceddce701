"""What a command prints on stdout with --json: exactly one document, a result or an error."""

from __future__ import annotations

import json
import sys

_emitted = False


def emit_json(doc) -> None:
    """Print the command's one JSON document; every command's result carries ``requests``, the
    storage requests this run made per operation (repository/counting.py), unless it reports its
    own. An error document keeps its own fixed shape."""
    from imgbackup.repository.storage import requests_made

    global _emitted
    _emitted = True
    if isinstance(doc, dict) and "requests" not in doc and "error" not in doc:
        doc = {**doc, "requests": requests_made()}
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def emitted() -> bool:
    """Whether the document was printed already (an error after it then adds none)."""
    return _emitted
