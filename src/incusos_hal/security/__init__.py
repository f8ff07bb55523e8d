"""The security policy over the HAL: volumes, recovery keys, TPM re-binding."""
