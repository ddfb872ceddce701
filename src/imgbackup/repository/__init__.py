"""The repository: storage backends, locking, keys and config, packs, chunk index, image catalog."""
