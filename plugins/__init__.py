"""Built-in plugins (installed as suncet.plugins), registered through entry points."""
