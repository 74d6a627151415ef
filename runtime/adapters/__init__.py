"""Adapters: the PEFT on-disk format, the disk store, residency, and the batched adapter math."""
