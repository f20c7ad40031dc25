from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "quotas"
    label = "xaas_quotas"
    verbose_name = "Quotas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (rule cache invalidation on commit)
