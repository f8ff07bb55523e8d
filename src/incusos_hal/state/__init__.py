"""The state directory: the stored config and what is kept beside it."""
