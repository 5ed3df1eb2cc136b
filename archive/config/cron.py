"""Cron lines in the config: parsed and checked here, run by the daemon's scheduler."""
from __future__ import annotations

import re

from apscheduler.triggers.cron import CronTrigger

_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def cron_trigger(expr: str) -> CronTrigger:
    """A 5-field crontab line with cron's meaning. APScheduler 3 numbers weekdays
    from Monday = 0, cron from Sunday = 0 (or 7): numeric weekdays are turned into
    names first, so "0 3 * * 0" runs on Sunday as every admin expects."""
    fields = expr.split()
    if len(fields) == 5:
        fields[4] = re.sub(r"\d+", lambda m: _DAYS[int(m.group())] if int(m.group()) <= 7
                           else m.group(), fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone="UTC")
