from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    label = "xaas_metering"
    verbose_name = "Metering"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import appender, checks, rollups  # noqa: F401  (registers checks, the move and tenant-change receivers)
