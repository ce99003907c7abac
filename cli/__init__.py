"""The `suncet` command line (installed as suncet.cli)."""
