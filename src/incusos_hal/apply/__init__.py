"""Applying the stored config: the configure step, and systemd's D-Bus API."""
