"""copy: images and the chunks they need into another repository (raw between related ones, else re-encrypted)."""
