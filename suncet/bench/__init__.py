"""Micro-benchmarks shipped with the package (`suncet bench ...`); their JSON goes through
suncet.engine.rundir.write_json, the one atomic writer."""
