"""Finding, identifying and opening disks: mounts and usage, sources, identity, discovery."""
