"""RabbitMQ adapter (pika), after dramatiq's ``brokers/rabbitmq``.

* :mod:`.connection` — the topology and the one reconnect loop (one backoff) both
  connections run;
* :mod:`.publisher` — a ``SelectConnection`` I/O thread, publisher confirms per batch;
* :mod:`.consumer` — a ``BlockingConnection`` per queue, work on a thread pool;
* :mod:`.broker` — :class:`RabbitBroker`, the :class:`messaging.broker.Broker` they make up.
"""

from messaging.rabbitmq.broker import RabbitBroker
from messaging.rabbitmq.connection import declare_topology
from messaging.rabbitmq.consumer import QueueConsumer
from messaging.rabbitmq.publisher import AsyncPublisher

__all__ = ["AsyncPublisher", "QueueConsumer", "RabbitBroker", "declare_topology"]
