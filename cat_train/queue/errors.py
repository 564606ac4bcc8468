"""The errors of `queue`. Every refusal is a QueueError whose text names the fix; ServerDown is the one a sweep
lives through: the run goes to another server and the silent one is probed until it answers. ServerError is the
ServerDown of a server that does answer, with HTTP 5xx: where the answer is about one prompt (/history), the prompt
is left where it is and read again instead."""
from __future__ import annotations


class QueueError(RuntimeError):
    pass


class ServerDown(QueueError):
    """The server did not answer (connection refused/reset, timeout, 5xx) after the retries."""


class ServerError(ServerDown):
    """The server answered with HTTP 5xx after the retries: it is up, but this request failed there."""
