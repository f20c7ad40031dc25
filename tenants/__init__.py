"""A tree of tenants (organization -> project -> key ...) and the per-request tenant context."""
