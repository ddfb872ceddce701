"""Engines: one package per command (backup, restore, mount, verify); what several share sits beside them."""
