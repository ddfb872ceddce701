"""``imgbackup verify``: chunks authenticated, filesystems checked by their own tools, and a QEMU boot."""
