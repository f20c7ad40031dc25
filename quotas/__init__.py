"""Hierarchical quotas over the tenant lineage (QuotaPolicyHandler, QuotaExceeded). Filled by the quotas issue."""
