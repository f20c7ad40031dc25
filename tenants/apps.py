from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    # Generic labels such as "tenants" clash easily with host projects; ours are namespaced.
    label = "xaas_tenants"
    verbose_name = "Tenants"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401  (registers checks and cache invalidation)
