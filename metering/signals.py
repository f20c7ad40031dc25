"""Metering signals."""

from django.dispatch import Signal

# Sent after the fact's transaction commits. Arguments: event (a ValidEvent), record_id, context (TenantContext).
usage_recorded = Signal()
