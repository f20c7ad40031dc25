"""Quota limits. The quotas issue adds its models here."""
