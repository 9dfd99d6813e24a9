"""`--every SECONDS`: a due-work command as a loop, for installations without Airflow.

One pass, a pause, again. SIGTERM or SIGINT lets the pass in progress finish (nothing is left
claimed half way), then the loop ends and the command exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def repeat(one_pass: Callable[[], None], every: float) -> None:
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after this pass", signal.Signals(signum).name)
        stop.set()

    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, request_stop) for number in stops}
    try:
        while not stop.is_set():
            one_pass()
            stop.wait(every)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
