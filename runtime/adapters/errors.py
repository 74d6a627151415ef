"""What adapter validation refuses with, and the two PEFT file names (shared by the format's modules)."""
from __future__ import annotations

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(Exception):
    """An adapter that cannot be accepted; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
