"""imgbackup: block-level disk image backup with changed-block tracking."""

__version__ = "0.1.0"
