"""One module per dataset release; each registers itself (registry.register) when imported."""
