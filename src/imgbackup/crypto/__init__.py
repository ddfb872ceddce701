"""Keys and the authenticated envelope every stored object is sealed in. Imports nothing above it."""
