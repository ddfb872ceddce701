"""The command line: parsing and printing only; the engines do the work."""
