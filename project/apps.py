from django.apps import AppConfig


class ExampleProjectConfig(AppConfig):
    """The example project as an app: its demo command (``seed_demo``) and its templates. Never in the wheel."""

    name = "project"
    label = "example_project"
    verbose_name = "Example project"
