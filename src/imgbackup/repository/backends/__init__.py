"""Storage backends, one module each; ``repository.storage.open_storage`` picks one from a URL."""
