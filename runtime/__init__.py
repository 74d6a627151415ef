"""loraplex.runtime."""
