"""What each gated op and each replacement costs per protocol, from the calibrated cost tables.

For every family's op (kept) and replacement (cut), a layer of ``--elements`` elements (softmax in
rows of ``--row``) is priced with :func:`snl_fx.cost.model.price`, as ``pi_cost`` prices the
lowered model: bytes per element and the layer's rounds. Prints a Markdown table (README,
"Linearizing transformers").

Example:
    .venv/bin/python benchmarks/replacement_prices.py --elements 2048 --row 17
"""

from __future__ import annotations

import argparse

from snl_fx.cost.model import nonlinearity_features, price, relu_features, scale_features
from snl_fx.passes.families import FAMILIES

PROTOCOLS = ("spu-cheetah", "spu-semi2k", "crypten")


def layer(kind: str, elements: int, row: int | None) -> dict[str, float]:
    if kind == "relu":
        return relu_features(elements)
    if kind == "scale":
        return scale_features(elements)
    return nonlinearity_features(kind, elements, row if kind == "softmax" else None)


def cost(kinds: tuple[str, ...], elements: int, row: int, protocol: str) -> tuple[float | None, int | None]:
    """(bytes per element, rounds) of one layer of each kind in ``kinds`` over ``elements`` elements."""
    nbytes, rounds = 0.0, 0
    for kind in kinds:
        b, r, _ = price(layer(kind, elements, row), protocol)
        if b is None:
            return None, None
        nbytes, rounds = nbytes + b, rounds + (r or 0)
    return nbytes / elements, rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elements", type=int, default=2048)
    p.add_argument("--row", type=int, default=17)
    args = p.parse_args()
    rows = []
    for family in ("gelu", "softmax"):
        spec = FAMILIES[family]
        rows.append((f"{family} (kept)", (spec.kinds[0],)))
        rows += [(f"{family} -> {r}", spec.replacement_kinds[r]) for r in spec.replacements]
    rows.insert(0, ("relu (kept)", ("relu",)))
    head = " | ".join(f"{p} B/element (rounds)" for p in PROTOCOLS)
    print(f"| op, a layer of {args.elements:,} elements (softmax rows of {args.row}) | {head} |")
    print("|---|" + "---|" * len(PROTOCOLS))
    for name, kinds in rows:
        cells = []
        for protocol in PROTOCOLS:
            per, rounds = cost(kinds, args.elements, args.row, protocol) if kinds else (0.0, 0)
            cells.append("not priced" if per is None else f"{per:,.0f} ({rounds})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
