from django.contrib import admin
from django.urls import path

from . import demo

urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/completions", demo.completions, name="demo-completions"),
]
