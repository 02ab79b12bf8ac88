"""Benchmark stages with wall-clock budgets, for a run that must end in time and keep what it measured.

A stage gets a record (a dict in the results) to write its numbers into as it goes. A stage whose cost cannot be
known beforehand (compiling, loading) may `borrow` the time earlier stages left unused. It ends `ok`, `over budget`
(interrupted by SIGALRM when its time ran out), `failed` (its exception's traceback tail is kept) or `skipped`
(a stage it needs did not end `ok`, or no time was left); either way the results are written out again and the
run goes on with the next stage.
"""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

Record = dict[str, Any]


class StageTimeout(BaseException):
    """Raised in the main thread when a stage's budget runs out. A BaseException, so that `except Exception`
    inside the stage (a poll loop, a retry) does not swallow it."""


def _expire(signum: int, frame: FrameType | None) -> None:
    raise StageTimeout


class StageRunner:
    def __init__(
        self, stages: Record, write: Callable[[], None], total_s: float, skip: frozenset[str] = frozenset()
    ) -> None:
        self.stages = stages  # name -> record, inside the results that `write` saves
        self.skip = skip  # stages the caller left out (a device session spending its last minutes on the rest)
        self.write = write
        self.deadline = time.monotonic() + total_s
        self.unused_s = 0.0  # what finished and skipped stages left of their budgets

    def ok(self, name: str) -> bool:
        return bool(self.stages.get(name, {}).get("status") == "ok")

    def run(
        self,
        name: str,
        budget_s: float,
        fn: Callable[[Record], None],
        needs: tuple[str, ...] = (),
        borrow: bool = False,
    ) -> bool:
        record: Record = {"status": "running", "budget_s": budget_s}
        self.stages[name] = record
        missing = [need for need in needs if not self.ok(need)]
        limit = min(budget_s + (self.unused_s if borrow else 0.0), self.deadline - time.monotonic())
        if name in self.skip or missing or limit <= 0:
            record["status"] = "skipped"
            if name in self.skip:
                record["reason"] = "left out by the caller (--skip)"
            elif missing:
                record["reason"] = f"needs {', '.join(missing)}"
            else:
                record["reason"] = "no time left in the run's total budget"
            self.unused_s += budget_s
            self._report(name, record)
            return False
        record["limit_s"] = limit
        previous = signal.signal(signal.SIGALRM, _expire)
        signal.setitimer(signal.ITIMER_REAL, limit)
        started = time.perf_counter()
        try:
            fn(record)
            record["status"] = "ok"
        except StageTimeout:
            record["status"] = "over budget"
            record["error"] = f"stopped after {limit:.0f} s"
        except Exception:
            record["status"] = "failed"
            record["error"] = traceback.format_exc()[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            record["wall_s"] = time.perf_counter() - started
            self.unused_s = max(0.0, self.unused_s + budget_s - record["wall_s"])
        self._report(name, record)
        ok: bool = record["status"] == "ok"
        return ok

    def _report(self, name: str, record: Record) -> None:
        self.write()
        wall = f" in {record['wall_s']:.1f} s" if "wall_s" in record else ""
        limit = (
            f", {record['limit_s']:.0f} s with borrowed time" if record.get("limit_s", 0) > record["budget_s"] else ""
        )
        print(f"[stage] {name}: {record['status']}{wall} (budget {record['budget_s']:.0f} s{limit})", flush=True)
        if "error" in record or "reason" in record:
            print(record.get("error") or record["reason"], flush=True)
