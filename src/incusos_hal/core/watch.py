"""Whether anything in a directory changed, for the price of one poll(2): inotify.

The API reads the stored config on every request (the peer check needs socket_uids);
stat'ing its two files each time was a tenth of a request's CPU. A watch on the state
directory answers "nothing changed" from an empty event queue. The kernel queues the
event before the write, rename, unlink or chmod that caused it returns, so a change
that happened before a request arrived is always seen by that request.

What a directory watch does not see: a file changed through another name (a hard link
elsewhere, a symlink's target) and a filesystem mounted over the directory. The caller
keeps checking the files itself when they are links; once the watch is lost (the
directory removed, moved or unmounted), `changed()` is always True.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import weakref

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_IGNORED = 0x8000
# The watch itself has gone: nothing more will be reported for this directory.
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
WATCHED = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class DirectoryWatch:
    """`changed()`: whether the directory's entries may have changed since the last call,
    or since the watch was made (so: make it before the first read). Raises OSError when
    no watch can be had (no inotify, the directory missing, the watch limit reached)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        # Closed with the object (a Service made per test must not leak descriptors).
        self._close = weakref.finalize(self, os.close, fd)
        if libc.inotify_add_watch(fd, os.fsencode(path), WATCHED) < 0:
            errno = ctypes.get_errno()
            self._close()
            raise OSError(errno, os.strerror(errno), os.fspath(path))
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.lost = False

    def changed(self) -> bool:
        if self.lost:
            return True
        if not self._poll.poll(0):
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & GONE:
                    self.lost = True
                    self._close()
                    return

    def close(self) -> None:
        self.lost = True
        self._close()
