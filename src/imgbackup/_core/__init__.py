"""Native kernels (Cython, GIL released) and their pure-Python references.

Nothing here imports from the rest of imgbackup. ``scan`` classifies and hashes chunks,
``bitmap`` works on packed used-block bitmaps. ``reference`` holds the slow, obvious
versions the tests compare the kernels against.
"""

try:
    from imgbackup._core import bitmap, scan
except ImportError as exc:  # pragma: no cover - depends on the build
    detail = "" if "cannot import name" in str(exc) else f" [{exc}]"
    raise ImportError(
        "imgbackup's compiled core is missing or broken: reinstall with 'pip install .' "
        f"(needs a C compiler and Cython){detail}"
    ) from None

__all__ = ["bitmap", "scan"]
