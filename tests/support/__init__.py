"""Test harnesses shared by the areas of the suite: paths, free ports, reference data, real
servers and daemons on loopback, wire-format fakes of remote APIs (``fakes/``)."""
