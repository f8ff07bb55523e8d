"""The mark of a field Incus's Go structs tag `omitempty`: it leaves the JSON when it holds
its zero value (`inventory.model.to_json` reads it). Its own module so that the section
modules, which define the classes, and `model`, which serialises them, both import it
without importing each other."""

from __future__ import annotations

OMIT = {"omitempty": True}
