"""loraplex.protos."""
