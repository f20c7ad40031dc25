"""Metering adapters; ``METERING["ADAPTER"]`` names the one ``get_meter()`` returns."""
