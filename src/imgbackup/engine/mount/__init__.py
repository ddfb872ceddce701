"""``imgbackup mount`` / ``umount`` / ``restore-files``: an image as a read-only FUSE tree, and copying files out."""
