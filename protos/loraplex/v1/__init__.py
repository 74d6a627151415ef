"""Generated stubs of proto package `loraplex.v1` (see loraplex.protos.generate)."""
