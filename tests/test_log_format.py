"""The front end's log lines (the stack's share the format): timestamps in UTC, ISO 8601 with a 'Z', whatever the
host's zone. A real front end process (no Triton behind it), started and stopped with SIGTERM."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest

from serving.frontend.process import FrontendProcess
from serving.triton.ports import free_port

STAMPED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z omnigen2\.frontend INFO (.*)")


def test_front_end_log_lines_are_stamped_in_utc_with_a_z(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: local time with no zone ("2026-11-26 09:42:16,123" on a host in Honolulu, 10 h off UTC)."""
    monkeypatch.setenv("TZ", "Pacific/Honolulu")  # the child's zone: a local-time stamp would be 10 h off
    log = tmp_path / "frontend.log"
    began = datetime.datetime.now(datetime.UTC)
    with FrontendProcess(f"127.0.0.1:{free_port()}", log):
        pass
    lines = [STAMPED.fullmatch(line) for line in log.read_text().splitlines() if "omnigen2.frontend " in line]
    assert lines and all(lines), log.read_text()
    first, last = lines[0], lines[-1]
    assert first is not None and last is not None
    assert first.group(2).startswith("OmniGen2 API on 127.0.0.1:")
    assert last.group(2) == "front end stopped: no call in flight (0 cut by the drain)"
    stamped = datetime.datetime.fromisoformat(first.group(1) + "+00:00")
    assert abs(stamped - began) < datetime.timedelta(minutes=5)
