"""Native kernels (Cython, GIL released) and their pure-Python references.

Nothing here imports from the rest of imgbackup. ``scan`` classifies and hashes chunks,
``bitmap`` works on packed used-block bitmaps, ``table`` sorts and searches the chunk index's
rows. ``reference`` and ``tableref`` hold the slow, obvious versions the tests compare the
kernels against.

``IMGBACKUP_CORE=reference`` makes ``scan`` and ``bitmap`` *be* ``reference`` (and ``table``
``tableref``) for the whole
process (also for ``from imgbackup._core.bitmap import …``), so the suite can run the engines on
the definitions instead of the kernels, as python-zstandard does for its backends.
"""

import os
import sys

_CORE = os.environ.get("IMGBACKUP_CORE", "native")

if _CORE == "reference":
    from imgbackup._core import reference as _reference
    from imgbackup._core import tableref as _tableref

    sys.modules[f"{__name__}.scan"] = sys.modules[f"{__name__}.bitmap"] = _reference
    sys.modules[f"{__name__}.table"] = _tableref
    scan = bitmap = _reference
    table = _tableref
elif _CORE == "native":
    try:
        from imgbackup._core import bitmap, scan, table
    except ImportError as exc:  # pragma: no cover - depends on the build
        detail = "" if "cannot import name" in str(exc) else f" [{exc}]"
        raise ImportError(
            "imgbackup's compiled core is missing or broken: reinstall with 'pip install .' "
            f"(needs a C compiler and Cython){detail}"
        ) from None
else:
    raise ImportError(f"IMGBACKUP_CORE must be 'native' or 'reference', not {_CORE!r}")

__all__ = ["bitmap", "scan", "table"]
