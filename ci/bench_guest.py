"""Runs inside the VM guest for ci/bench: NVMe Identify Controller through the HAL (cffi
extension, then the pure-Python fallback) against `nvme id-ctrl -o json`, the command a
user would run, on the same controller. Prints one JSON line of seconds per call."""

import json
import subprocess
import time

from incusos_hal import _native
from incusos_hal.hal import nvme

DEVICE = "/dev/nvme0"


def per_call(fn, n):
    fn()  # warm: the first call pays for imports and page faults
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


out = {"backend_built": _native.backend}
for backend in ("cffi", "python"):
    _native.use(backend)
    out[backend] = per_call(lambda: nvme.identify_controller(DEVICE), 500)
out["nvme-cli"] = per_call(
    lambda: subprocess.run(
        ["nvme", "id-ctrl", DEVICE, "-o", "json"], capture_output=True, check=True
    ),
    30,
)
print(json.dumps(out))
