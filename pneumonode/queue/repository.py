"""The whole queue over one engine: every part in one object, for the service and the CLI to wire.

Each consumer names the narrow part it uses: :class:`~pneumonode.queue.jobs.JobTransitions`
(intake, worker), :class:`~pneumonode.queue.deliveries.DeliveryTransitions` (sender),
:class:`~pneumonode.queue.admin.QueueAdmin` (CLI, scheduler, retention),
:class:`~pneumonode.queue.reads.QueueReads` (metrics).
"""

from __future__ import annotations

from pneumonode.queue.admin import QueueAdmin
from pneumonode.queue.deliveries import DeliveryTransitions
from pneumonode.queue.jobs import JobTransitions


class JobRepository(JobTransitions, DeliveryTransitions, QueueAdmin):
    """Every transition and read of jobs and deliveries, on one engine."""
