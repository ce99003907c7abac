"""Micro-benchmarks shipped with the package (`suncet bench ...`)."""
