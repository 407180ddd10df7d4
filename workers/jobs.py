"""Release 0.1's name of the feedback job, kept for one release: an event queued by a 0.1 gateway
(`workers.jobs.store_feedback`, the whole completion record in its payload) is still stored after an upgrade.
The job itself lives in `feedback/jobs.py`; remove this module in release 0.3."""

from __future__ import annotations

from feedback.jobs import store_feedback

__all__ = ["store_feedback"]
