"""The example project's own pages (top-level ``templates/``): the landing page at ``/`` and the admin's branding."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client


@pytest.mark.django_db
def test_the_landing_page_explains_the_demo_and_links_where_to_click():
    response = Client().get("/")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'href="/admin/"' in page and 'href="/api/docs/"' in page
    assert "X-Tenant-ID: acme-chat-key-1" in page and "429" in page
    assert "http://testserver/demo/completions" in page  # the host the visitor used, not a hard-coded port


@pytest.mark.django_db
def test_the_admin_is_branded_and_its_view_site_link_leads_somewhere():
    login = Client().get("/admin/login/")
    assert "XaaS metering &amp; quotas" in login.content.decode()
    assert "Django administration" not in login.content.decode()
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "x" * 16))
    index = client.get("/admin/").content.decode()
    assert 'href="/"' in index  # "View site"
    assert client.get("/").status_code == 200
