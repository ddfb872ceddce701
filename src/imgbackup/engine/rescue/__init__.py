"""Rescue media: build a bootable ISO holding imgbackup, and what runs inside it once booted.

``media`` builds the ISO on a host (Debian packages via mmdebstrap, squashfs, grub-mkrescue);
``params`` reads the ``imgbackup.*`` kernel parameters (a contract, see the README);
``unattended`` carries out ``imgbackup.action=restore`` inside the booted system; ``menu`` is
the interactive guide on its consoles.
"""
