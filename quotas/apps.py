from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "quotas"
    label = "xaas_quotas"
    verbose_name = "Quotas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from metering import counters

        from . import signals  # noqa: F401  (rule cache invalidation on commit)
        from .ledger import reserved_units

        # reconcile_usage compares the live reserved counters with the open reservations, as it does usage.
        counters.register_kind(
            counters.RESERVED,
            lambda tenant_pk, path, feature, start, end, using: reserved_units(path, feature, start, end, using),
        )
