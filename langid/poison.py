"""Poison files: one whose decoding kills the process (a decoder crash, the OOM killer) must cost its own row,
not the job. Ray retries a task whose worker died, without limit; a ledger (a small actor) counts, per file,
the decodings that began and never finished, and after POISON_TRIES the file is not decoded again but recorded
as an error. The other files of its batch are decoded on the retry as usual."""
from __future__ import annotations

import os

POISON_TRIES = 3  # decodings of one file that may end with the process dying
PROCESS_DIED = "process died while decoding"


class Attempts:
    """Made in the driver, passed to the decoding tasks: `admit(key)` before decoding a file, `done(key)` after."""

    def __init__(self):
        import ray

        self.ledger = ray.remote(num_cpus=0)(_Ledger).remote()

    def admit(self, key: str) -> bool:
        """False when decoding `key` has already ended its process POISON_TRIES times."""
        import ray

        return ray.get(self.ledger.begin.remote(key))

    def done(self, key: str) -> None:
        self.ledger.end.remote(key)  # not awaited: a lost message only counts one try too many


class _Ledger:
    def __init__(self):
        self.open: dict[str, int] = {}  # decodings begun and not finished, per file

    def begin(self, key: str) -> bool:
        tries = self.open.get(key, 0)
        if tries >= POISON_TRIES:
            return False
        self.open[key] = tries + 1
        return True

    def end(self, key: str) -> None:
        self.open.pop(key, None)


CRASH_VARIABLE = "LANGID_TEST_CRASH_ON"


def crash_hook(path: str) -> None:
    """Tests only: the decoding process exits hard on a file whose name (not folder) holds $LANGID_TEST_CRASH_ON,
    as a decoder crash or the OOM killer would end it."""
    marker = os.environ.get(CRASH_VARIABLE)
    if marker and marker in os.path.basename(path):
        os._exit(1)
