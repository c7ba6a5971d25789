"""The settlement job's process: ``python -m oncely.demo.shop.settler`` (configured by the
``ONCELY_DEMO_*`` environment, see :mod:`oncely.demo.shop.settings`); stops on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from oncely.demo.shop.features.settlement import settle_forever
from oncely.demo.shop.settings import Settings


def main() -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settle_forever(Settings.from_env(), stop)


if __name__ == "__main__":
    main()
