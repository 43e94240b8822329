"""Result files: JSON Schema, atomic locked store, validation."""
