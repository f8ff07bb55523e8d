"""Probe part (stdlib only): run expect["command"]["argv"] in /probe, for `ci/vm run`."""

import subprocess


def run(expect: dict) -> dict:
    spec = expect["command"]
    try:
        proc = subprocess.run(
            spec["argv"],
            cwd="/probe",
            capture_output=True,
            text=True,
            timeout=spec.get("timeout", 900),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": 127, "out": "", "err": f"{spec['argv'][0]}: {e}\n"}
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}
