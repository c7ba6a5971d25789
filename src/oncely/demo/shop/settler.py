"""The settlement job's process: ``python -m oncely.demo.shop.settler`` (configured by the
``ONCELY_DEMO_*`` environment, see :mod:`oncely.demo.shop.settings`); stops on SIGTERM/SIGINT,
and with ``--parent PID`` once that process (its parent, the demo) is gone."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from oncely.demo.shop.features.settlement import settle_forever
from oncely.demo.shop.serve import exit_with_parent
from oncely.demo.shop.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent", type=int, default=None, help="stop once this process is gone")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.parent is not None:
        exit_with_parent(args.parent)
    settle_forever(Settings.from_env(), stop)


if __name__ == "__main__":
    main()
