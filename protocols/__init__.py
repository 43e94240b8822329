"""Frozen, versioned protocol definitions (data files; see benchsuite.protocols)."""
