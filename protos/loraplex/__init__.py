"""loraplex.protos.loraplex: proto package `loraplex`."""
