"""Background jobs: one module per periodic job, each a thread with ``start()``/``stop()``.

They sit in ``aigen`` (above ``saga`` and ``persistence``) because each combines both: a
command on the message bus plus table maintenance. Broker-facing threads (the outbox relay,
the result consumer) stay in ``messaging``.
"""
