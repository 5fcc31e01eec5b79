"""Simulated CPU devices: XLA's host platform split into N devices, so that
sharded code runs on one machine (tests, the benchmark, local runs).

Importing this module does not start JAX's backend; `request` must run before
anything does.
"""

import os

# XLA aborts the whole process when a device has waited 40 s (its default) at a
# collective's rendezvous for the others. Simulated devices share the machine's
# cores, so on a busy 2-core host one device can lag that far behind its peers in
# a correct program: CI saw a test worker aborted that way. Waits that long are
# not errors here; a real deadlock still ends, after half an hour.
_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
                  "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(count: int, existing: str = "") -> str:
    """XLA_FLAGS for `count` simulated CPU devices: `existing` flags, the count
    (replacing any earlier count) and patient collective timeouts (unless set)."""
    flags = [flag for flag in existing.split() if not flag.startswith(_COUNT_FLAG)]
    flags.append(f"{_COUNT_FLAG}={count}")
    for timeout_flag in _TIMEOUT_FLAGS:
        if timeout_flag.split("=")[0] not in existing:
            flags.append(timeout_flag)
    return " ".join(flags)


def request(count: int) -> None:
    """Asks for `count` simulated CPU devices in this process, unless XLA_FLAGS
    already chose a count (a launcher's worker keeps its own)."""
    existing = os.environ.get("XLA_FLAGS", "")
    if _COUNT_FLAG not in existing:
        os.environ["XLA_FLAGS"] = xla_flags(count, existing)
