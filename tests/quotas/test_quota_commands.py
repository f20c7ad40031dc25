from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from quotas.models import QuotaLimit
from tests.factories import tree

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("quota", *args, stdout=out)
    return out.getvalue()


def test_set_list_and_check():
    tree({"org": None, "p1": "org", "k1": "p1", "other": None})
    assert "1000 per month (hard)" in run("set", "org", "llm_tokens", "1000")
    run("set", "p1", "llm_tokens", "10", "--period", "hour")
    run("set", "org", "llm_tokens", "2000")  # changes the existing month limit
    run("set", "other", "llm_tokens", "5", "--soft")
    assert QuotaLimit.objects.count() == 3
    rows = json.loads(run("list", "k1", "--json"))
    assert [(row["tenant"], row["limit"], row["period"]) for row in rows] == [
        ("org", "2000", "month"),
        ("p1", "10", "hour"),
    ]
    assert "soft" in run("list")
    output = run("check", "k1", "llm_tokens", "10")
    assert "allowed" in output and "remaining 10" in output
    with pytest.raises(CommandError, match="blocked at p1"):
        run("check", "k1", "llm_tokens", "11")


@pytest.mark.parametrize(
    "args",
    [
        ("set", "ghost", "llm_tokens", "1"),
        ("set", "org", "llm_tokens", "-1"),
        ("set", "org", "llm_tokens", "abc"),
        ("set", "org", "llm_tokens", "\uff11\uff12"),  # fullwidth digits: Decimal() reads them as 12
        ("set", "org", "llm_tokens", " 7 "),
        ("set", "org", "llm_tokens", "1e3"),
        ("set", "org", "llm_tokens", "1000000000000000000"),  # past the limit column
        ("set", "org", "bad feature", "1"),
        ("check", "org", "llm_tokens", "nan"),
    ],
)
def test_bad_input_is_a_command_error(args):
    tree({"org": None})
    with pytest.raises(CommandError):
        run(*args)
    assert QuotaLimit.objects.count() == 0
