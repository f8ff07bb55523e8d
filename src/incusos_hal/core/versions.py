"""A release's version as the update index spells it, one grammar for every place that
takes one: the index's releases, an application's kept images (a file name), the local
image source's `NAME_VERSION.raw`. It starts with a letter or digit (never `.`, `..` or
option-like) and has no `/`: it is a directory name, a file name and a URL segment."""

from __future__ import annotations

import re

VERSION_PATTERN = r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}"
VERSION = re.compile(VERSION_PATTERN, re.ASCII)
