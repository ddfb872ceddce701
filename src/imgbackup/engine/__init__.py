"""Engines: the pipelines that tie source, repository and target together (backup, restore, verify, mount)."""
