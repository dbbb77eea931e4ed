"""The main process's end of a queue worker's channel (vhostd/shell/worker.py
WorkerProcess) against a real worker process: answers arrive on the loop, and a worker
that does not answer in time is taken for dead."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from vhostd.shell import worker as worker_mod
from vhostd.shell.worker import WorkerProcess


async def _answer(call: Any) -> tuple[Any, Any]:
    fut: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
    call(lambda states, error: fut.set_result((states, error)))
    return await asyncio.wait_for(fut, 10)


def test_answers_come_through_the_loop() -> None:
    async def run() -> None:
        w = WorkerProcess("w1")
        gone: list[WorkerProcess] = []
        w.attach(asyncio.get_running_loop(), gone.append)
        try:
            states, error = await _answer(lambda done: w.stats([], done))
            assert (states, error) == ({}, None)
            states, error = await _answer(lambda done: w.recall(["nothing/0"], done))
            assert (states, error) == ({}, None)
        finally:
            w.close()
        assert not gone

    asyncio.run(run())


def test_a_worker_that_does_not_answer_is_taken_for_dead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_mod, "ANSWER_TIMEOUT", 0.3)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        w = WorkerProcess("w1")
        gone: list[WorkerProcess] = []
        w.attach(loop, gone.append)
        os.kill(w.pid, signal.SIGSTOP)
        try:
            t0 = loop.time()
            states, error = await _answer(lambda done: w.stats(["x/0"], done))
            assert states is None and "no answer to stats within 0 s" in error
            assert loop.time() - t0 < 5
            assert gone == [w] and w.dead
            # Later calls fail at once.
            states, error = await _answer(lambda done: w.stats([], done))
            assert "not running" in error
        finally:
            os.kill(w.pid, signal.SIGCONT)
            w.close()
        assert w.proc.returncode is not None

    asyncio.run(run())
