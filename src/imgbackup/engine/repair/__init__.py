"""imgbackup repair: rebuild the chunk index from the packs and report what damage costs which image."""
