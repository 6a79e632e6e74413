"""Adapters: one module per technology, each satisfying a port of ``broker.core.ports``."""
