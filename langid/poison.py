"""Poison files: one whose decoding kills the process (a decoder crash, the OOM killer) must cost its own row,
not the job. Ray retries a task whose worker died, without limit; so before decoding a file a task leaves a
marker (a tiny file named after the file's key, holding how many decodings of it began) and removes it when the
decoding ends. A marker that says POISON_TRIES means the file killed every process that tried it: it is not
decoded again but recorded as an error, and the other files of its batch are decoded on the retry as usual.

Markers live on the node's local disk (a retry on another node of a cluster counts from zero there, so the
bound is POISON_TRIES per node), in a folder of this run that the driver removes at the end."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid

POISON_TRIES = 3  # decodings of one file that may end with the process dying
PROCESS_DIED = "process died while decoding"
CRASH_VARIABLE = "LANGID_TEST_CRASH_ON"


class Attempts:
    """Made in the driver (a new run id), passed to the decoding tasks: `admit(key)` before decoding a file,
    `done(key)` after it; `close()` in the driver at the end."""

    def __init__(self):
        self.folder = os.path.join(tempfile.gettempdir(), "langid-attempts", uuid.uuid4().hex)

    def _marker(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest())

    def admit(self, key: str) -> bool:
        """False when decoding `key` has already ended its process POISON_TRIES times on this node."""
        marker = self._marker(key)
        try:
            with open(marker) as f:
                tries = int(f.read() or 0)
        except (OSError, ValueError):
            tries = 0
        if tries >= POISON_TRIES:
            return False
        os.makedirs(self.folder, exist_ok=True)
        with open(marker, "w") as f:
            f.write(str(tries + 1))
        return True

    def done(self, key: str) -> None:
        try:
            os.remove(self._marker(key))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def crash_hook(path: str) -> None:
    """Tests only: the decoding process exits hard on a file whose name (not folder) holds $LANGID_TEST_CRASH_ON,
    as a decoder crash or the OOM killer would end it."""
    marker = os.environ.get(CRASH_VARIABLE)
    if marker and marker in os.path.basename(path):
        os._exit(1)
