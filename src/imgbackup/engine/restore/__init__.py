"""``imgbackup restore``: plan a restore onto a disk, partition or file (every refusal first), then write it."""
