"""Broker adapters (RabbitMQ via pika, and an in-process stand-in), the outbox relay and the
result consumer. Consumer policy — parsing, dead-lettering, redelivery — lives here, not in
saga handlers."""
