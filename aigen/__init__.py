"""Composition root: settings, wiring, the ``aigen`` CLI and the embedded demo worker."""
