"""A user's Cancel as the core loop sees it, for the tests of every trainer."""


class Cancelled(Exception):
    """What a host's Cancel looks like to the loop: an exception from the step callback."""


def cancel_at(step: int):
    """A step callback that raises Cancelled once the loop reports `step` (the user pressed Cancel then)."""
    def callback(info):
        if info.step == step:
            raise Cancelled
    return callback
