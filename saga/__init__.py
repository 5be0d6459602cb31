"""The generation saga: state machine, price book and command handlers.

Pure domain code: nothing here opens a socket or a file. Handlers talk to the outside world
only through the ports in :mod:`saga.ports`, which ``persistence`` and ``messaging`` implement.
"""
