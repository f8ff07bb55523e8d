"""The security policy over the HAL, in IncusOS's terms: the `/1.0/system/security` state
(`state`), the encrypted volumes crypttab names (`volumes`), recovery keys (`recovery`) and
re-binding volumes to the TPM (`rebind`). Import the module you need; this package's face
stays empty so that importing one does not load the others."""
