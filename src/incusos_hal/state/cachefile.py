"""The one file format of the boot path's caches: `generator.cache` and `configure.cache`.

Both are read before anything else is imported, so this module imports only `_blake2`
(built into the interpreter) and is written for that: no `from __future__`, no `os`.

A cache is `MAGIC`, a line with the BLAKE2b digest of the body, then the body: lines and
length-prefixed blobs. The digest makes a damaged or hand-edited cache unusable (the
reader says None and its caller takes the slow path); it is a checksum, not a
signature: whoever can write the state directory can write the config itself.
"""

import _blake2

ABSENT = b"-1\n"


def digest(body: bytes) -> bytes:
    return _blake2.blake2b(body, digest_size=32).hexdigest().encode()


def blob(data: bytes | None) -> bytes:
    """A length-prefixed blob; None (a file that is absent) is its own value."""
    return ABSENT if data is None else b"%d\n%s\n" % (len(data), data)


def seal(magic: bytes, body: bytes) -> bytes:
    return magic + digest(body) + b"\n" + body


def unseal(magic: bytes, data: bytes | None) -> bytes | None:
    """The body of a sealed cache, or None when it is absent, another format or damaged."""
    if data is None or not data.startswith(magic):
        return None
    end = data.find(b"\n", len(magic))
    if end < 0:
        return None
    body = data[end + 1 :]
    if data[len(magic) : end] != digest(body):
        return None
    return body


class Reader:
    """Reads a body back; every malformation raises ValueError (or IndexError)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def line(self) -> bytes:
        end = self.data.index(b"\n", self.pos)
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out

    def text(self) -> str:
        return self.line().decode()

    def number(self) -> int:
        text = self.line()
        if not text.isdigit():
            raise ValueError("not a count")
        return int(text)

    def blob(self) -> bytes | None:
        size = int(self.line())
        if size < 0:
            if size != -1:
                raise ValueError("bad size")
            return None
        end = self.pos + size
        if self.data[end : end + 1] != b"\n":
            raise ValueError("truncated cache")
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out

    def present(self) -> bytes:
        data = self.blob()
        if data is None:
            raise ValueError("missing value")
        return data

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def read_or_none(path: str | bytes) -> bytes | None:
    """A file's bytes, None when it does not exist; other errors raise."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
