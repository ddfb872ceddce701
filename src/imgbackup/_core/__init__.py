"""Native kernels (Cython, GIL released) and their pure-Python references.

Nothing here imports from the rest of imgbackup. ``scan`` classifies and hashes chunks,
``bitmap`` works on packed used-block bitmaps. ``reference`` holds the slow, obvious
versions the tests compare the kernels against.
"""

try:
    from imgbackup._core import bitmap, scan
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "imgbackup's compiled core is missing: reinstall with 'pip install .' "
        f"(needs a C compiler, Cython and libssl-dev) [{exc}]"
    ) from None

__all__ = ["bitmap", "scan"]
