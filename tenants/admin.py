"""The tenant tree in the admin: indented, with lineage breadcrumbs; moves go through Tenant.save (tenants.tree).

The apps above extend ``TenantAdmin`` and register their subclass in its place (``replace_tenant_admin``):
``metering.admin`` adds the usage column and the tenant page's charts, ``quotas.admin`` the quota bars and the
quotas inline. tenants imports neither.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import ForeignKey, QuerySet
from django.forms import ModelChoiceField, ModelForm
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from .admin_scope import (
    TenantScopedAdminMixin,
    UnscopedOnlyAdminMixin,
    admin_scope,
    key_exemption_refusal,
    tenant_exemption_refusal,
)
from .apikeys import issue
from .models import ApiKey, Tenant, TenantAdminScope


class ScopedTenantForm(ModelForm):
    """Refuses, as a form error, what would let a scoped administrator acquire an exemption (tenants.admin_scope).

    Used for the change and add forms and for list editing; fields the form does not show keep the stored values,
    so a crafted POST of a read-only field changes nothing and a refused one writes nothing."""

    xaas_scope: Tenant | None = None

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or self.cleaned_data
        if self.xaas_scope is None:
            return cleaned
        exempt = cleaned.get("exempt", False) if "exempt" in self.fields else self.instance.exempt
        parent = cleaned.get("parent") if "parent" in self.fields else self.instance.parent
        refusal = tenant_exemption_refusal(self.xaas_scope, self.instance.pk, exempt=bool(exempt), parent=parent)
        if refusal is not None:
            field, message = refusal
            self.add_error(field if field in self.fields else None, message)
        return cleaned


def _scoped_form(form: Any, request: HttpRequest) -> Any:
    return type(form.__name__, (form,), {"xaas_scope": admin_scope(request)})


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """The tree: ordered by path, indented, with each row's lineage (constant queries per page).

    Subclasses annotate the page's rows (``annotate_page``) and add to the tenant page (``render_change_form``).
    """

    tenant_lookup = ""  # the model is the tenant
    edit_strictly_below = True  # a scoped administrator's own tenant is view-only
    # Fields that lift or move limits and billing: never set from inside a scope.
    scoped_readonly_fields = ("exempt", "lago_subscription_id")

    list_display: Any = ("indented_id", "name", "kind", "lineage_crumbs", "is_active", "exempt")
    list_display_links = ("indented_id",)
    list_filter = ("kind", "exempt", "is_active")
    search_fields = ("external_id", "name")
    ordering = ("path",)
    autocomplete_fields = ("parent",)
    readonly_fields = ("lineage", "created_at", "updated_at")
    form = ScopedTenantForm
    actions = ("make_exempt", "end_exemption")
    fields = (
        "external_id",
        "name",
        "kind",
        "parent",
        "is_active",
        "exempt",
        "lago_subscription_id",
        "metadata",
        "lineage",
        "created_at",
        "updated_at",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Tenant | None = None) -> tuple[str, ...]:
        # A tenant id is stable: it names the tenant in headers, API keys and the billing system.
        readonly = tuple(self.readonly_fields)
        if obj is not None:
            readonly = (*readonly, "external_id")
        if admin_scope(request) is not None:
            model_fields = {field.name for field in Tenant._meta.get_fields()}
            readonly = (*readonly, *(name for name in self.scoped_readonly_fields if name in model_fields))
        return readonly

    def get_fields(self, request: HttpRequest, obj: Tenant | None = None) -> Any:
        fields = super().get_fields(request, obj)
        scope = admin_scope(request)
        if scope is not None and obj is not None and obj.pk == scope.pk:
            # The scope's own parent is outside the scope: not even named.
            fields = [name for name in fields if name != "parent"]
        return fields

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        return _scoped_form(super().get_form(request, obj, change=change, **kwargs), request)

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        kwargs.setdefault("form", ScopedTenantForm)
        return _scoped_form(super().get_changelist_form(request, **kwargs), request)

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        # The last word, whatever form or code path brought the object here: inside the view's transaction, so a
        # refusal (403) leaves nothing written, inlines included.
        refusal = tenant_exemption_refusal(
            admin_scope(request), obj.pk if change else None, exempt=obj.exempt, parent=obj.parent
        )
        if refusal is not None:
            raise PermissionDenied(refusal[1])
        super().save_model(request, obj, form, change)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if admin_scope(request) is not None:
            for name in ("make_exempt", "end_exemption"):
                actions.pop(name, None)
        return actions

    @admin.action(description="Make the selected tenants exempt (zero-cap)", permissions=["change"])
    def make_exempt(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        self._set_exempt(request, queryset, True)

    @admin.action(description="End the exemption of the selected tenants", permissions=["change"])
    def end_exemption(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        self._set_exempt(request, queryset, False)

    def _set_exempt(self, request: HttpRequest, queryset: QuerySet[Tenant], exempt: bool) -> None:
        if admin_scope(request) is not None:  # not offered to them; refused if posted anyway
            raise PermissionDenied("Only an administrator without a tenant scope can change exemptions.")
        changed = 0
        for tenant in queryset.filter(exempt=not exempt):
            tenant.exempt = exempt  # one save per row, so every listener (lineage cache) hears of it
            tenant.save(update_fields=["exempt", "updated_at"])
            changed += 1
        self.message_user(request, f"{changed} tenant(s) updated.", messages.SUCCESS)

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField[Any] | None:
        if db_field.name == "parent" and admin_scope(request) is not None:
            kwargs["required"] = True  # a root would be outside the scope
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    # ---- the tree page: every row annotated from a constant number of queries ----

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)  # evaluated once; the template iterates the same objects
        self.annotate_page(request, page)
        return changelist

    def annotate_page(self, request: HttpRequest, page: list[Tenant]) -> None:
        """Annotate the rows of one page of the tree, in a constant number of queries (subclasses add columns)."""
        self._annotate_lineage(request, page)

    def _annotate_lineage(self, request: HttpRequest, tenants: list[Tenant]) -> None:
        """Each tenant's visible ancestors (from the scope's tenant down) in one query for the whole page."""
        scope = admin_scope(request)
        top = scope.depth if scope is not None else 0
        wanted = {pk for tenant in tenants for pk in tenant.ancestor_pks[top:-1]}
        names = dict(Tenant.objects.filter(pk__in=wanted).values_list("pk", "external_id")) if wanted else {}
        for tenant in tenants:
            tenant._xaas_indent = tenant.depth - top  # type: ignore[attr-defined]
            tenant._xaas_lineage = [  # type: ignore[attr-defined]
                {"pk": pk, "external_id": names[pk], "url": self._change_url(pk)}
                for pk in tenant.ancestor_pks[top:-1]
                if pk in names
            ]

    def _change_url(self, pk: int) -> str:
        return reverse(f"{self.admin_site.name}:xaas_tenants_tenant_change", args=[pk])

    @admin.display(description="tenant id", ordering="path")
    def indented_id(self, tenant: Tenant) -> str:
        indent = getattr(tenant, "_xaas_indent", tenant.depth)
        return format_html(
            '<span class="xaas-tree-node" data-depth="{}" style="padding-left:{}em;white-space:nowrap">{}{}</span>',
            indent,
            indent * 1.5,
            "└ " if indent else "",
            tenant.external_id,
        )

    @admin.display(description="lineage")
    def lineage_crumbs(self, tenant: Tenant) -> str:
        ancestors = getattr(tenant, "_xaas_lineage", [])
        if not ancestors:
            return "-"
        return format_html(
            '<span class="xaas-lineage" style="font-size:0.9em;white-space:nowrap">{}</span>',
            format_html_join(
                mark_safe(" &rsaquo; "), '<a href="{}">{}</a>', ((a["url"], a["external_id"]) for a in ancestors)
            ),
        )

    # ---- the tenant page ----

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Tenant | None:
        tenant = super().get_object(request, object_id, from_field)
        if tenant is not None:
            self._annotate_lineage(request, [tenant])
        return tenant

    @admin.display(description="lineage")
    def lineage(self, tenant: Tenant) -> str:
        if not tenant.path:
            return "-"
        ancestors = getattr(tenant, "_xaas_lineage", None)
        if ancestors is None:
            return "-"
        return " > ".join([*(ancestor["external_id"] for ancestor in ancestors), tenant.external_id])

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Tenant | None = None,
    ) -> Any:
        if obj is not None and obj.pk is not None:
            context["xaas_lineage"] = getattr(obj, "_xaas_lineage", [])
        return super().render_change_form(request, context, add, change, form_url, obj)


def replace_tenant_admin(admin_class: type[TenantAdmin], site: admin.AdminSite | None = None) -> None:
    """Register ``admin_class`` (a ``TenantAdmin`` subclass of an app above tenants) for ``Tenant`` in place of the
    one registered. Each app's subclass extends the one below it, so the last registered has every app's parts."""
    site = site or admin.site
    if site.is_registered(Tenant):
        site.unregister(Tenant)
    site.register(Tenant, admin_class)


@admin.register(TenantAdminScope)
class TenantAdminScopeAdmin(UnscopedOnlyAdminMixin, admin.ModelAdmin):
    """Who administers which subtree. Managed by unscoped administrators only; superusers are never narrowed."""

    list_display = ("user", "tenant", "created_at")
    search_fields = ("user__username", "tenant__external_id")
    list_select_related = ("user", "tenant")
    autocomplete_fields = ("tenant",)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        user_field = form.base_fields.get("user")
        if isinstance(user_field, ModelChoiceField) and user_field.queryset is not None:
            user_field.queryset = user_field.queryset.filter(is_staff=True, is_superuser=False)
            user_field.help_text = "A staff user (not a superuser: superusers always see everything)."
        return form


class ScopedApiKeyForm(ModelForm):
    """The add form of a key: a scoped administrator may not issue keys inside an exempt subtree."""

    xaas_scope: Tenant | None = None

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or self.cleaned_data
        refusal = key_exemption_refusal(self.xaas_scope, cleaned.get("tenant"))
        if refusal is not None:
            self.add_error(*refusal)
        return cleaned


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """API keys: the plaintext is shown once, right after creation; the list shows only the public prefix."""

    list_display = ("prefix", "tenant", "name", "state", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), ("expires_at", admin.EmptyFieldListFilter))
    search_fields = ("prefix", "tenant__external_id", "name")
    list_select_related = ("tenant",)
    autocomplete_fields = ("tenant",)
    ordering = ("-created_at",)
    actions = ("revoke_keys",)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("tenant", "name", "expires_at")
        return ("prefix", "tenant", "name", "expires_at", "created_at", "revoked_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("prefix", "tenant", "created_at", "revoked_at", "last_used_at")

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs.setdefault("form", ScopedApiKeyForm)
        return _scoped_form(super().get_form(request, obj, change=change, **kwargs), request)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        refusal = key_exemption_refusal(admin_scope(request), obj.tenant)
        if refusal is not None:
            raise PermissionDenied(refusal[1])
        # Only its hash is stored; the plaintext lives in this object until response_add draws it, once.
        obj._xaas_plaintext = issue(obj)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        """The new key on the response to the POST itself, never cached, never in a message (the messages cookie is
        signed, not encrypted) and never on a later page: whoever misses it creates a new key."""
        plaintext = getattr(obj, "_xaas_plaintext", None)
        if plaintext is None:  # pragma: no cover - every add goes through save_model
            return super().response_add(request, obj, post_url_continue)
        opts = self.opts
        context = {
            **self.admin_site.each_context(request),
            "title": "API key created",
            "subtitle": None,
            "opts": opts,
            "key": obj,
            "plaintext": plaintext,
            "changelist_url": reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_changelist"),
            "change_url": reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]),
        }
        response = TemplateResponse(request, "admin/xaas_tenants/apikey/created.html", context)
        add_never_cache_headers(response)  # Cache-Control: no-store (and no-cache, private, max-age=0)
        return response

    @admin.display(description="state")
    def state(self, key: ApiKey) -> str:
        if key.revoked_at is not None:
            return "revoked"
        return "expired" if key.is_expired() else "active"

    @admin.action(description="Revoke the selected API keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"{revoked} API key(s) revoked.", messages.SUCCESS)
