"""Contract suites: one set of tests run against the fake and the real adapter of a port."""
