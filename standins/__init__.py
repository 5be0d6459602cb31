"""Stand-ins for the services around us, shared by the tests and the benchmarks.

* :mod:`standins.n8n` — a scripted n8n on RabbitMQ (replies, faults, a collector);
* :mod:`standins.billing` — Odoo's billing service on loopback HTTP, with injectable faults.

A top-level package rather than ``tests.support`` (``bench/`` must not import the test
suite) or ``aigen.testing`` (they are not part of the shipped service: the wheel packages
only saga, api, messaging, persistence and aigen).
"""
