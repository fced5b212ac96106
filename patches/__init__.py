"""Small, explicit fixes for upstream packages, one module per fix.

Each module names the upstream package and the versions it targets, applies itself only where needed and
is idempotent. `apply_all()` applies every fix whose target is installed. See patches/README.md.
"""
