"""The apps form a strict stack, ``tenants`` <- ``metering`` <- ``quotas``: no module of an app names an app above it.

Every ``.py`` file of the three packages is parsed (management commands, migrations, templatetags, ``TYPE_CHECKING``
blocks and imports inside functions included, since ``ast.walk`` visits every node) and any of these that reaches a
higher app fails the test:

- ``import x`` / ``from x import y``, relative ones resolved against the module's package;
- ``importlib.import_module("x")``, ``import_string("x.Y")``, ``__import__("x")`` with a literal argument;
- ``apps.get_model("<label>", ...)``, ``apps.is_installed("x")`` / ``get_app_config("<label>")``;
- a migration dependency or model reference on a higher app's label (``("xaas_quotas", "0001_initial")``,
  ``"xaas_quotas.quotalimit"``) and any string literal that is a dotted path into a higher app
  (``"quotas.handler.QuotaPolicyHandler"``: a class chosen by path is still an upward dependency).

The checker is tested on bad modules too, so it is known to fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
STACK = ("tenants", "metering", "quotas")  # each app may import only those before it
LABELS = {"xaas_tenants": "tenants", "xaas_metering": "metering", "xaas_quotas": "quotas"}
IMPORTING_CALLS = {"import_module", "import_string", "__import__", "get_model", "is_installed", "get_app_config"}
DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    target: str
    how: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} {self.how} {self.target!r}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _app_of(target: str) -> str | None:
    """The app a dotted module path, app label or ``label.model`` reference belongs to (``None``: none of ours)."""
    head = target.split(".", 1)[0]
    if head in STACK:
        return head
    return LABELS.get(head)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: max(0, len(base) - (level - 1))]
    return ".".join([*base, name] if name else base)


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _names_a_module(node: ast.Constant) -> bool:
    """A string literal that is a dotted path or an app label (prose has spaces: docstrings never match)."""
    if not isinstance(node.value, str):
        return False
    return bool(DOTTED.fullmatch(node.value)) and ("." in node.value or node.value in LABELS)


def upward_references(source: str, module: str, *, is_package: bool = False) -> list[Violation]:
    """Every reference in ``source`` (the text of ``module``) to an app above the module's app."""
    app = module.split(".", 1)[0]
    higher = set(STACK[STACK.index(app) + 1 :])
    found: list[Violation] = []

    def check(target: str, line: int, how: str) -> None:
        if _app_of(target) in higher:
            found.append(Violation(module, line, target, how))

    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno, "imports")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module) if node.level else node.module or ""
            check(base, node.lineno, "imports from")
            for alias in node.names:  # ``from . import quotas`` at the top of a package would name one too
                check(f"{base}.{alias.name}" if base else alias.name, node.lineno, "imports")
        elif isinstance(node, ast.Call) and _call_name(node) in IMPORTING_CALLS:
            for argument in node.args[:1]:
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    check(argument.value, node.lineno, f"{_call_name(node)}()")
        elif isinstance(node, ast.Constant) and _names_a_module(node) and id(node) not in docstrings:
            check(str(node.value), node.lineno, "names")
    return found


def app_modules() -> list[Path]:
    return sorted(path for app in STACK for path in (ROOT / app).rglob("*.py"))


def test_every_module_of_the_apps_is_checked():
    modules = {module_name(path) for path in app_modules()}
    # Lazy imports hide in these: make sure the walk reaches them.
    for expected in (
        "tenants.management.commands.tenant",
        "tenants.migrations.0001_initial",
        "tenants.admin",
        "metering.api.errors",
        "metering.migrations.0001_initial",
        "quotas.api",
    ):
        assert expected in modules
    assert len(modules) > 100


def test_no_app_imports_an_app_above_it():
    violations = [
        str(violation)
        for path in app_modules()
        for violation in upward_references(path.read_text(), module_name(path), is_package=path.name == "__init__.py")
    ]
    assert violations == []


BAD_MODULES = [
    (
        "tenants.management.commands.tenant",
        "from metering.usage import usage_by_tenant_and_feature\n",
        "metering.usage",
    ),
    ("tenants.admin", "def f():\n    from quotas.models import QuotaLimit\n", "quotas.models"),
    ("tenants.models", "import metering.usage as usage\n", "metering.usage"),
    ("metering.api.urls", "from quotas.api import QuotaViewSet\n", "quotas.api"),
    ("metering.api.errors", "import quotas\n", "quotas"),
    ("metering.api.errors", "from ... import quotas\n", "quotas"),  # relative, climbing out of metering
    ("metering", "from . import x\nfrom quotas import exceptions\n", "quotas"),
    (
        "metering.recorder",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quotas.ledger import Decision\n",
        "quotas.ledger",
    ),
    ("metering.tasks", "import importlib\nhandler = importlib.import_module('quotas.handler')\n", "quotas.handler"),
    (
        "tenants.lineage",
        "from django.utils.module_loading import import_string\nimport_string('metering.x.Y')\n",
        "metering.x.Y",
    ),
    ("tenants.admin", "from django.apps import apps\nif apps.is_installed('quotas'):\n    pass\n", "quotas"),
    ("metering.models", "from django.apps import apps\napps.get_model('xaas_quotas', 'QuotaLimit')\n", "xaas_quotas"),
    (
        "metering.migrations.0007_x",
        "class Migration:\n    dependencies = [('xaas_metering', '0006'), ('xaas_quotas', '0001_initial')]\n",
        "xaas_quotas",
    ),
    ("tenants.migrations.0005_x", "FIELD = {'to': 'xaas_metering.usagerecord'}\n", "xaas_metering.usagerecord"),
    ("metering.adapters.x", "class A:\n    sink_class = 'quotas.sinks.QuotaSink'\n", "quotas.sinks.QuotaSink"),
]


@pytest.mark.parametrize(("module", "source", "target"), BAD_MODULES)
def test_the_checker_fails_on_an_upward_reference(module, source, target):
    violations = upward_references(source, module, is_package=module == "metering")
    assert target in {violation.target for violation in violations}


GOOD_MODULES = [
    ("quotas.api", "from metering.api.base import ApiView\nfrom tenants.lineage import get_context\n"),
    ("quotas.admin", "def f():\n    from metering.admin import MeteringTenantAdmin\n"),
    ("metering.api.errors", "from tenants.exceptions import TenantError\nfrom .base import ApiView\n"),
    ("metering.api.errors", "from .. import usage\nfrom ..delivery import outbox\n"),  # metering.usage: same app
    ("metering.usage", '"""Read usage (quotas.ledger reads it too: quotas may import metering)."""\n'),
    ("tenants.models", "HELP = 'quotas and usage of the subtree'\nLOGGER = 'tenants.lineage'\n"),
    (
        "metering.migrations.0007_x",
        "class Migration:\n    dependencies = [('xaas_tenants', '0004_tenantadminscope')]\n",
    ),
]


@pytest.mark.parametrize(("module", "source"), GOOD_MODULES)
def test_the_checker_allows_imports_down_the_stack_and_prose(module, source):
    assert upward_references(source, module) == []


# ---- naming: ``tenant_id`` is the external string, a primary key is ``tenant_pk`` / ``tenant`` ----------------------

TENANT_ID_NAMES = {"tenant_id", "tenant_ids"}


def _holds_a_pk(value: ast.expr) -> bool:
    text = ast.unparse(value)
    return text.endswith((".pk", ".id", "_pk")) or text.endswith(".pk]")


def tenant_id_holding_a_pk(source: str, module: str) -> list[Violation]:
    """Parameters, annotated names and dataclass fields called ``tenant_id(s)`` typed ``int``; names and dict keys
    ``tenant_id`` assigned a ``.pk``. (Django's own FK attname ``tenant_id``, in ``filter(tenant_id=...)`` or
    ``quota.tenant_id``, is the column's name and is not ours to rename.)"""
    found: list[Violation] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg) and node.arg in TENANT_ID_NAMES and node.annotation is not None:
            if re.search(r"\bint\b", ast.unparse(node.annotation)):
                found.append(Violation(module, node.lineno, node.arg, "an int parameter named"))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name | ast.Attribute):
            name = node.target.id if isinstance(node.target, ast.Name) else node.target.attr
            if name in TENANT_ID_NAMES and re.search(r"\bint\b", ast.unparse(node.annotation)):
                found.append(Violation(module, node.lineno, name, "an int field named"))
        elif isinstance(node, ast.Assign) and _holds_a_pk(node.value):
            for target in node.targets:
                assigned = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                if assigned in TENANT_ID_NAMES:
                    found.append(Violation(module, node.lineno, str(assigned), "a primary key assigned to"))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in TENANT_ID_NAMES and _holds_a_pk(value):
                    found.append(Violation(module, node.lineno, str(key.value), "a primary key under the key"))
    return found


def test_tenant_id_never_names_a_primary_key():
    violations = [
        str(violation)
        for path in app_modules()
        for violation in tenant_id_holding_a_pk(path.read_text(), module_name(path))
    ]
    assert violations == []


@pytest.mark.parametrize(
    "source",
    [
        "def f(tenant_id: int) -> None: ...\n",
        "def f(tenant_ids: list[int] | None = None) -> None: ...\n",
        "from dataclasses import dataclass\n@dataclass\nclass Fact:\n    tenant_id: int\n",
        "tenant_id = context.tenant.pk\n",
        "payload = {'tenant_id': tenant.pk, 'feature': feature}\n",
    ],
)
def test_the_naming_check_fails_on_a_pk_called_tenant_id(source):
    assert tenant_id_holding_a_pk(source, "metering.x") != []


def test_the_naming_check_allows_the_external_id_and_django_attnames():
    source = (
        "def f(tenant_id: str, tenant_pk: int) -> None:\n"
        "    rows = UsageRollup.objects.filter(tenant_id=tenant_pk)\n"
        "    tenant_id = context.tenant_id\n"
        "    return {'tenant_id': tenant.external_id, 'tenant_pk': tenant.pk, 'x': quota.tenant_id}\n"
    )
    assert tenant_id_holding_a_pk(source, "metering.x") == []
