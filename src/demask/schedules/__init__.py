"""Masking schedules: one file each, one time convention (t = 0 clean, t = 1 fully masked).

A new schedule is one file plus one line in `SCHEDULES`; tests/test_schedules.py runs over all.
"""

from __future__ import annotations

from collections.abc import Callable

from demask._checks import check_choice
from demask.schedules.base import Schedule
from demask.schedules.cosine import CosineSchedule
from demask.schedules.custom import CallableSchedule
from demask.schedules.linear import LinearSchedule

__all__ = [
    "SCHEDULES",
    "CallableSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "Schedule",
    "get_schedule",
]

# name -> schedule class (no arguments)
SCHEDULES: dict[str, type] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
}


def get_schedule(schedule: str | Schedule | Callable) -> Schedule:
    """A schedule from a registry name, a schedule object, or a callable t -> mask ratio.

    Callables here speak the package convention (t = 1 fully masked); the seed's progress-callable
    is converted by `NonAutoregressiveWrapper` (`CallableSchedule(fn, progress=True)`, whose
    mask_ratio(t) = fn(1 - t)). Either way the callable is checked when it is built.
    """
    if isinstance(schedule, str):
        return SCHEDULES[check_choice("schedule", schedule, SCHEDULES)]()
    if isinstance(schedule, Schedule):
        return schedule
    return CallableSchedule(schedule)
