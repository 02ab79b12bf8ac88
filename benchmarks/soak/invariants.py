"""The invariants a stack keeps through a storm, as pure functions of what was read from it: /metrics text, access-log
lines, the storm's call records, probe and admission results, process memory. Each gives one PASS/FAIL `Check` with
the numbers it saw, so that a failing run says what was wrong without a rerun; SKIP when it had nothing to check."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.soak.mix import is_http
from serving.frontend.metrics_page import Samples

# Gauges that count what calls hold: all zero once nothing is in flight and every client has gone.
IDLE_GAUGES = (
    "omnigen2_in_flight_requests",
    "omnigen2_http_connections",
    "omnigen2_held_request_bytes",
    "omnigen2_admitted_input_pixels",
    "omnigen2_admitted_step_tokens",
    "omnigen2_admitted_chat_tokens",
    "omnigen2_admitted_output_pixels",
)
_ACCESS = re.compile(
    r"omnigen2\.access INFO (?:HTTP (?P<http_method>\S+) (?P<route>\S+)|(?P<method>\S+)) peer=\S+ (?:client=\S+ )?"
    r"status=(?P<status>\S+) seconds=\S+ request_id=(?P<id>\S+)"
)


@dataclass
class Check:
    name: str
    passed: bool
    seen: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # what broke it, first few examples each
    skipped: bool = False  # nothing to check: neither a pass nor a failure

    @property
    def result(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"


def skip(name: str, why: str) -> Check:
    return Check(name, True, {"skipped": why}, skipped=True)


@dataclass(frozen=True)
class AccessLine:
    api: str  # "grpc" or "http"
    what: str  # the gRPC method, or the HTTP route
    status: str
    request_id: str


def parse_access_log(lines: Iterable[str]) -> list[AccessLine]:
    parsed = []
    for line in lines:
        match = _ACCESS.search(line)
        if match is None:
            continue
        if match["route"] is not None:
            parsed.append(AccessLine("http", match["route"], match["status"], match["id"]))
        else:
            parsed.append(AccessLine("grpc", match["method"], match["status"], match["id"]))
    return parsed


def _label(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels)


def check_idle(samples: Samples, waited_s: float) -> Check:
    values = {
        name + (f"{{{_label(labels)}}}" if labels else ""): value
        for (name, labels), value in samples.items()
        if name in IDLE_GAUGES
    }
    missing = [name for name in IDLE_GAUGES if not any(key.startswith(name) for key in values)]
    failures = [f"{key} = {value:g} after {waited_s:.1f} s idle" for key, value in values.items() if value != 0]
    failures += [f"{name} not exported" for name in missing if name != "omnigen2_http_connections"]
    return Check("gauges back to idle", not failures, {"gauges": values, "waited_s": round(waited_s, 1)}, failures)


def _counted(samples: Samples) -> Counter[tuple[str, str, str]]:
    counted: Counter[tuple[str, str, str]] = Counter()
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "omnigen2_requests_total":
            counted["grpc", label["method"], label["code"]] += int(value)
        elif name == "omnigen2_http_requests_total":
            counted["http", label["route"], label["status"]] += int(value)
    return counted


def check_counters(before: Samples, after: Samples, lines: list[AccessLine]) -> Check:
    """The request counters' growth over the storm against the access-log lines written in it, by method (route) and
    status: one line per counted call, and the same status in both."""
    delta = _counted(after)
    delta.subtract(_counted(before))
    logged = Counter((line.api, line.what, line.status) for line in lines)
    keys = sorted(set(delta) | set(logged))
    differ = [f"{'/'.join(k)}: counted {delta[k]}, logged {logged[k]}" for k in keys if delta[k] != logged[k]]
    seen = {"counted": sum(delta.values()), "logged": sum(logged.values()), "by_status_differing": len(differ)}
    return Check("request counters equal access-log lines", not differ, seen, differ[:20])


UNSENT_S = 0.01  # a gRPC call cancelled this soon (by design), may never have left its client: then no line is due
KILLED_UNSENT_S = 0.1  # the same for a call its client process was killed in, this soon after it began
CALL_LINES = "one access-log line per call, status as the client saw"


def _may_be_unseen(call: dict[str, Any]) -> str | None:
    """Why the server may never have known of the call, so that it owes it no access-log line; None if it must have.
    "unsent": it may never have left its client. "not received": it ended by its deadline or its client's cancel,
    which gRPC can settle while the call still waits in gRPC's queue for the server's loop: no handler ever runs
    (seen with the loop busy 0.5 s: a 50 ms deadline and a cancel at 0.1 s left no line)."""
    if not call["ended"]:
        killed_early = call.get("killed", False) and call["t"] - call["started"] < KILLED_UNSENT_S
        return "unsent" if killed_early else None  # an unfinished call (a worker fault) fails the storm check
    if is_http(call["kind"]):
        unsent = call["kind"] == "http-reset" or (call.get("by_client", False) and not call.get("sent", True))
        return "unsent" if unsent else None
    if not call.get("by_client") or call["fault"].get("stop_after_events") is not None:
        return None  # the server ended it, or sent it events first
    cancel_after = call["fault"].get("cancel_after_s")
    return "unsent" if cancel_after is not None and cancel_after <= UNSENT_S else "not received"


def _status_fits(call: dict[str, Any], logged: str) -> bool:
    """Whether the status logged is one the server may have given the call, knowing what its client saw."""
    seen, kind = str(call.get("seen")), call["kind"]
    if not call["ended"] or kind == "http-reset":
        return True  # the client died or reset the connection: any ending is the server's to choose
    if is_http(kind):
        if call.get("by_client"):
            return True  # dropped by the client: 499, or whatever the server finished with before it noticed
        return not seen.isdigit() or seen == logged  # a status read whole must be the one logged
    if not call.get("by_client"):
        return seen == logged
    # The client's own end may lose the race to any ending of the server's. A cancel (no deadline was set) logged
    # DEADLINE_EXCEEDED is a wrong record; a deadline logged CANCELLED is not: gRPC sends the client's expired
    # deadline as a reset, which may reach the server before its own timer fires (counted in `seen`).
    return not (seen == "CANCELLED" and logged == "DEADLINE_EXCEEDED")


def check_call_lines(calls: dict[str, dict[str, Any]], lines: list[AccessLine]) -> Check:
    """Every call of the storm has exactly one access-log line of its API (an HTTP call's gRPC line aside), with a
    status that fits what its client saw; a call the server may never have known of (_may_be_unseen) may have none,
    counted by why."""
    by_id: dict[tuple[str, str], list[AccessLine]] = {}
    for line in lines:
        by_id.setdefault((line.api, line.request_id), []).append(line)
    problems: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    unseen: Counter[str] = Counter()
    deadline_cancelled = 0
    for call_id, call in calls.items():
        api = "http" if is_http(call["kind"]) else "grpc"
        found = by_id.get((api, call_id), [])
        seen = call.get("seen", "client killed")
        why = _may_be_unseen(call)
        if not found and why is not None:
            unseen[why] += 1
            continue
        if len(found) != 1:
            problem = f"{call['kind']}: {len(found)} lines (client saw {seen})"
        elif not _status_fits(call, found[0].status):
            problem = f"{call['kind']}: client saw {seen}, logged {found[0].status}"
        else:
            deadline_cancelled += seen == "DEADLINE_EXCEEDED" and found[0].status == "CANCELLED"
            continue
        problems[problem] += 1
        examples.setdefault(problem, []).append(call_id)
    failures = [
        f"{problem}: {n} calls, e.g. {', '.join(examples[problem][:3])}" for problem, n in problems.most_common()
    ]
    numbers = {
        "calls": len(calls),
        "calls_wrongly_logged": sum(problems.values()),
        "unsent_no_line": unseen["unsent"],
        "possibly_never_received": unseen["not received"],
        "deadline_logged_cancelled": deadline_cancelled,
    }
    return Check(CALL_LINES, not failures, numbers, failures)


def check_storm(
    exits: dict[str, int | None], killed: Iterable[str], errors: list[dict[str, Any]], calls: dict[str, dict[str, Any]]
) -> Check:
    """The storm ran as planned: every worker it did not SIGKILL exited 0 (a hung one it killed at the end did not),
    no worker fault, and every call has an outcome (an end record, or its worker was killed in it)."""
    killed = set(killed)
    bad_exits = {name: code for name, code in exits.items() if name not in killed and code != 0}
    unfinished = [call_id for call_id, call in calls.items() if not call["ended"] and call["worker"] not in killed]
    failures = [f"worker {name} exited {code} (its .err file says why)" for name, code in sorted(bad_exits.items())]
    failures += (
        [f"{len(errors)} worker errors, e.g. {errors[0].get('kind')}: {errors[0].get('error')}"] if errors else []
    )
    failures += [f"{len(unfinished)} calls without an outcome, e.g. {', '.join(unfinished[:3])}"] if unfinished else []
    failures += [] if calls else ["no call was made"]
    seen = {"workers": len(exits), "killed": len(killed), "worker_errors": len(errors), "calls": len(calls)}
    return Check("storm ran as planned", not failures, {**seen, "unfinished": len(unfinished)}, failures)


def check_probes(during: list[int], after: dict[str, int], tolerance: int) -> Check:
    """Probe pixels against the same requests run alone before the storm, in levels of 255: within `tolerance`
    (batching beside other requests moves a few pixels by rounding, docs/api.md)."""
    worst = max([*during, *after.values()], default=0)
    over = [d for d in during if d > tolerance]
    failures = (
        [f"{len(over)} of {len(during)} probes in the storm over {tolerance} (worst {max(over)})"] if over else []
    )
    failures += [f"{name} after the storm: {d} levels" for name, d in after.items() if d > tolerance]
    failures += [] if after else ["no probe answered after the storm"]
    seen = {"probes_in_storm": len(during), "max_diff_in_storm": max(during, default=0), "after": after}
    return Check(
        f"probe pixels as alone (within {tolerance} level)", not failures, {**seen, "max_diff": worst}, failures
    )


def check_admission(max_in_flight: int, grpc_outcomes: list[str], http_statuses: list[int]) -> Check:
    """`max_in_flight` calls sent at once after the storm, on each API: all admitted and served."""
    name = f"admission takes --max-in-flight ({max_in_flight}) at once again"
    if not grpc_outcomes or not http_statuses:
        return skip(name, "no call sent on one API")
    failures = [f"gRPC: {Counter(grpc_outcomes)}"] if any(o != "OK" for o in grpc_outcomes) else []
    failures += [f"HTTP: {Counter(http_statuses)}"] if any(s != 200 for s in http_statuses) else []
    seen = {"max_in_flight": max_in_flight, "grpc": dict(Counter(grpc_outcomes)), "http": dict(Counter(http_statuses))}
    return Check(name, not failures, seen, failures)


def check_processes(before: dict[str, float], after: dict[str, float], max_growth: float) -> Check:
    """RSS in MiB by process (front end, tritonserver, each stub): the same processes after the storm (none died and
    was restarted), and the stack's total within `max_growth` times its size before. SKIP when no front end was
    found before the storm (nothing listens on its address locally: a remote stack)."""
    name = f"same processes, total RSS within {max_growth}x"
    if not before:
        return skip(name, "no stack process found before the storm")
    gone = sorted(set(before) - set(after))
    total_before, total_after = sum(before.values()), sum(after.values())
    failures = [f"process gone after the storm: {name}" for name in gone]
    if total_before and total_after > max_growth * total_before:
        failures.append(f"total RSS {total_before:.0f} -> {total_after:.0f} MiB, over {max_growth}x")
    seen = {
        "rss_mib_before": before,
        "rss_mib_after": after,
        "total_mib": [round(total_before), round(total_after)],
        "new_processes": sorted(set(after) - set(before)),
    }
    return Check(name, not failures, seen, failures)
