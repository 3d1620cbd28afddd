"""The daemon's deep integrity pass: each new checkpoint's checksums, read in the background.

A prune checks every new checkpoint cheaply (headers, indexes, sizes: milliseconds). When that
check passes, the checkpoint is offered here, and one background thread at idle I/O priority
(`daemon/integrity/background.py`) reads every checksummed byte of it (zip members' CRC-32,
TensorFlow and OCDBT CRC-32C). A checkpoint found corrupt then is recorded and alerted on as the
prune records the cheap check's findings (`integrity_corrupt`, the `disk.alert` command), and,
remembered in the integrity cache the prunes share with this pass, it is planned as corrupt
from the next prune on: kept, never counted as the newest, `last-good` protecting the one
before it.

Only checkpoints that complete while the daemon runs are offered (the look at a root after a
new checkpoint, and the prune it starts): the backlog a first start finds (hundreds of
gigabytes, perhaps) is checked cheaply only, and `ckptd verify --deep` reads it on demand.
`verify.deep: false` turns the pass off (the cheap check stays). A checkpoint deleted before its
turn is simply not checked (that result is not cacheable, and no alert is raised for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.config import Config
from daemon.history.log import History
from daemon.integrity.background import BackgroundVerifier, Job
from daemon.integrity.cache import IntegrityCache
from daemon.integrity.result import IntegrityResult
from daemon.logs import get_logger
from daemon.verification import record_corrupt

log = get_logger("ckptd.integrity")

SAVE_SECONDS = 60.0


class DeepPass:
    """Given the integrity cache the daemon's prunes use and how to reach the config and the
    history in force: deep-check each checkpoint offered, one at a time, in the background."""

    def __init__(
        self,
        cache: IntegrityCache,
        *,
        config: Callable[[], Config],
        history: Callable[[], History],
    ) -> None:
        self.cache = cache
        self._config = config
        self._history = history
        self.verifier = BackgroundVerifier(cache, self._on_result)
        self._saved_at = time.monotonic()

    def start(self) -> None:
        self.verifier.start()

    def use_cache(self, cache: IntegrityCache) -> None:
        """Given the cache of a new state_dir (a reload moved it), remember results there."""
        self.cache = cache
        self.verifier.cache = cache

    def stop(self, timeout: float = 10.0) -> None:
        """End the pass in progress within one chunk and drop the queue (the unfinished ones
        are offered again by the next start's prunes: nothing deep is remembered of them)."""
        self.verifier.stop(timeout)

    def offer(self, root: str, result: IntegrityResult) -> bool:
        """Given a root and a cheap check just made in it, queue the checkpoint's deep pass when
        that check passed and `verify.deep` is on; return whether it was queued."""
        if not self._config().verify.deep or result.deep or result.status != "ok":
            return False
        return self.verifier.submit(root, result.checkpoint, result.layout)

    def take(self, root: str, result: IntegrityResult) -> None:
        """`offer`, for a prune's `on_checked`."""
        self.offer(root, result)

    def pending(self) -> int:
        return self.verifier.pending()

    def _on_result(self, job: Job, result: IntegrityResult) -> None:
        """Given a finished deep pass (on its thread): remember it (saved once the queue is
        done, or a minute after the last save: each save writes the whole cache), and record and
        alert on a corrupt checkpoint that is still there as it was checked."""
        now = time.monotonic()
        if self.pending() <= 1 or now - self._saved_at > SAVE_SECONDS:
            self.cache.save()
            self._saved_at = now
        log.info(
            "deep_check_done",
            root=job.root,
            checkpoint=job.name,
            status=result.status,
            bytes_read=result.bytes_read,
        )
        if result.status == "corrupt" and result.cacheable:
            record_corrupt(self._config(), job.root, [result], self._history())
