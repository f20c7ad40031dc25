"""Metering signals."""

from django.dispatch import Signal

# Sent after the fact's transaction commits. Arguments: event (a ValidEvent), record_id, context (TenantContext).
usage_recorded = Signal()

# Log mode: sent INSIDE the drainer's batch transaction, once per batch that inserted facts (receivers' writes commit
# or roll back with the facts; an exception rolls the batch back, to be redone). Arguments: facts (a list of
# metering.drain.StoredFact), using (the database alias). quotas links committed reservations to their facts here.
facts_drained = Signal()
