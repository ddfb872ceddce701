"""``imgbackup backup``: plan the reads (used blocks, change list, parent), read the source, ingest chunks."""
