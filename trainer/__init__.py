"""loraplex.trainer."""
