"""Reload the policy without a restart: poll the directory, and reload on SIGHUP or on demand.

All disk work (the change check and the reload itself) runs in a worker thread, never on the
event loop; the store serialises concurrent reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

from broker.policy.store import PolicyRejected, PolicyStore, ReloadResult

log = logging.getLogger("broker.policy")

#: A change must look the same twice, this far apart, before it is read: an editor that truncates
#: then writes a file is not caught half-way.
MAX_SETTLE_SECONDS = 0.25


class PolicyWatcher:
    """Polls the policy directory every `interval` seconds (0 disables polling) and reloads."""

    def __init__(self, store: PolicyStore, *, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[object]] = set()
        self._sighup_loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling (call from the event loop, e.g. in the app's lifespan)."""
        if self._interval > 0 and not self.running:
            self._task = asyncio.get_running_loop().create_task(
                self._poll_forever(), name="policy-watcher"
            )

    async def stop(self) -> None:
        """Stop polling and wait for any reload this watcher started."""
        self.remove_sighup_handler()
        tasks: list[asyncio.Task[object]] = list(self._pending)
        if self._task is not None:
            self._task.cancel()
            tasks.append(self._task)  # type: ignore[arg-type]
            self._task = None
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def reload(self, *, trigger: str, by: str | None = None) -> ReloadResult:
        """Reload now (off the event loop); raises `PolicyRejected` when the edit is refused."""
        return await asyncio.to_thread(self._store.reload, trigger=trigger, by=by)

    async def check_once(self) -> ReloadResult | None:
        """One poll: reload if the directory changed since the last attempt and has settled.

        Returns the reload's result, or None when nothing changed, the change was still in
        progress, or the new version was refused (recorded by the store).
        """
        store = self._store
        if not await asyncio.to_thread(store.changed_since_last_attempt):
            return None
        first = await asyncio.to_thread(store.signature)
        await asyncio.sleep(min(MAX_SETTLE_SECONDS, self._interval / 2 or MAX_SETTLE_SECONDS))
        if await asyncio.to_thread(store.signature) != first:
            return None  # still being written; look again at the next poll
        try:
            return await self.reload(trigger="watch")
        except PolicyRejected:
            return None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die; the next poll tries again
                log.exception("policy watcher: unexpected error")

    def request_reload(self, trigger: str = "sighup") -> None:
        """The SIGHUP handler: schedule a reload on the running loop and return at once."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            self._reload_quietly(trigger)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reload_quietly(self, trigger: str) -> ReloadResult | None:
        try:
            return await self.reload(trigger=trigger)
        except PolicyRejected:
            return None  # recorded and reported by the store

    def install_sighup_handler(self) -> bool:
        """Reload on SIGHUP, when this is the main thread of a platform that has the signal.

        An app served from another thread (tests, embedded servers) cannot own signals; it
        returns False and relies on polling and the admin call instead.
        """
        if (
            not hasattr(signal, "SIGHUP")
            or threading.current_thread() is not threading.main_thread()
        ):
            return False
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload, "sighup")
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        self._sighup_loop = loop
        return True

    def remove_sighup_handler(self) -> None:
        if self._sighup_loop is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._sighup_loop.remove_signal_handler(signal.SIGHUP)
            self._sighup_loop = None
