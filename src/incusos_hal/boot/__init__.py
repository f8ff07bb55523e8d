"""The systemd generator: its fast path (no imports) and its slow path."""
