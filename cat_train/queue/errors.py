"""The two errors of `queue`. Every refusal is a QueueError whose text names the fix; ServerDown is the one a
sweep lives through: the run goes to another server and the silent one is probed until it answers."""
from __future__ import annotations


class QueueError(RuntimeError):
    pass


class ServerDown(QueueError):
    """The server did not answer (connection refused/reset, timeout, 5xx) after the retries."""
