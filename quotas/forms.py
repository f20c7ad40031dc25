"""Form fields of the quota admin: warning thresholds typed as ``80, 100`` rather than as JSON."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

# ASCII digits only: ``int()`` would also take Unicode digits ("٨٠") and underscores ("1_0").
_PERCENT = re.compile(r"[0-9]{1,3}")
MAX_THRESHOLDS = 10


class ThresholdsField(forms.Field):
    """Comma-separated whole percentages from 1 to 100 (``80, 100``), stored as the sorted list ``[80, 100]``;
    empty: no warnings. The former JSON form (``[80, 100]``) is still taken. Anything else is a form error naming
    the offending item."""

    widget = forms.TextInput

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", "Comma-separated whole percentages, e.g. 80, 100.")
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[int]:
        if isinstance(value, list):
            return value
        text = "" if value is None else str(value).strip()
        if text.startswith("[") and text.endswith("]"):  # the JSON list this field used to take
            text = text[1:-1].strip()
        if not text:
            return []
        items = [item.strip() for item in text.split(",")]
        if len(items) > MAX_THRESHOLDS:
            raise ValidationError(f"At most {MAX_THRESHOLDS} thresholds.", code="too_many")
        percents: set[int] = set()
        for item in items:
            if not _PERCENT.fullmatch(item) or not 1 <= int(item) <= 100:
                raise ValidationError(
                    "%(item)s is not a whole percentage from 1 to 100.", code="invalid", params={"item": repr(item)}
                )
            percents.add(int(item))
        return sorted(percents)

    def widget_attrs(self, widget: forms.Widget) -> dict[str, Any]:
        return {**super().widget_attrs(widget), "placeholder": "80, 100", "inputmode": "numeric"}


class ReadOnlyText(forms.Widget):
    """A disabled field drawn as text (a choice as its label, a boolean as yes/no), not as a greyed input that
    looks editable: for the rows a scoped administrator may view but not change. Disabled fields ignore what is
    posted, so nothing is lost by sending no input."""

    def __init__(self, choices: Any = (), attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs)
        self.choices = dict(choices)

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> Any:
        from django.utils.html import format_html

        if isinstance(value, bool):
            shown: Any = "yes" if value else "no"
        else:
            shown = self.choices.get(value, value)
        if isinstance(shown, list | tuple):
            shown = ", ".join(str(item) for item in shown)
        return format_html(
            '<span class="xaas-readonly" data-field="{}" title="view only">{}</span>',
            name,
            "-" if shown in (None, "") else shown,
        )


def read_only(field: forms.Field) -> None:
    """Disable ``field`` and draw it as text."""
    field.disabled = True
    field.widget = ReadOnlyText(choices=getattr(field, "choices", ()))
