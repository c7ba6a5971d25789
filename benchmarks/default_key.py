"""Benchmark: the default key of ``@idempotent`` (all arguments), typed text vs plain JSON.

    .venv/bin/python benchmarks/default_key.py [--n 20000] [--rounds 5]

The default key encodes every argument with its type (:func:`oncely.functions.keys.
typed_canonical`), so ``Decimal("5")`` and ``"5"`` are different calls. The baseline is what it
replaced: canonical JSON (``json.dumps(sort_keys=True, default=to_jsonable)``), which prints
both alike. Both run in this process, interleaved, on the same argument shapes; the ratio is
what to read (the machine is shared and noisy). Median microseconds per key of ``--rounds``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from oncely.codecs import to_jsonable
from oncely.functions.keys import typed_canonical


@dataclasses.dataclass
class Item:
    sku: str
    quantity: int
    price: Decimal


SHAPES: dict[str, dict[str, Any]] = {
    "two scalars": {"order_id": "o-123", "amount": 500},
    "uuid + decimal": {"order_id": uuid.UUID(int=7), "amount": Decimal("12.50")},
    "dict payload": {"payload": {"customer": "c-1", "amount": 500, "currency": "EUR", "n": 1.5}},
    "dataclass list": {
        "items": [Item("sku-1", 2, Decimal("9.99")), Item("sku-2", 1, Decimal("5"))]
    },
}


def plain_json(arguments: dict[str, Any]) -> str:
    return json.dumps(
        arguments, sort_keys=True, separators=(",", ":"), default=to_jsonable, ensure_ascii=False
    )


def per_key(fn: Callable[[dict[str, Any]], str], arguments: dict[str, Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(arguments)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'arguments':<16} {'typed µs':>9} {'JSON µs':>9} {'ratio':>6}")
    for name, arguments in SHAPES.items():
        typed, plain = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            typed.append(per_key(typed_canonical, arguments, args.n))
            plain.append(per_key(plain_json, arguments, args.n))
        t, p = statistics.median(typed), statistics.median(plain)
        print(f"{name:<16} {t:>9.2f} {p:>9.2f} {t / p:>5.2f}x")


if __name__ == "__main__":
    main()
