"""``python -m mosmedai_training train|evaluate|cards [--tool NAME|all] [--version N]``: every family's tools.

``make models`` runs ``train`` then ``evaluate``: each family module
(``mosmedai_training.<family>``) trains its networks on its phantoms with fixed seeds and
writes its model cards from held-out phantoms. ``--version N`` trains or evaluates one
version of the tools (``ToolSpec.versions``; weights in the version folders of
``<tool>_net`` and ``<tool>_post``, card and evaluation in the version's ensemble folder);
families whose training has no versions yet refuse any but 1. ``cards`` rewrites the model
cards of every version from their ``evaluation.json`` through the same card writers, without
evaluating again (after a change to the cards' text, such as their admission thresholds).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

from mosmedai.catalog.tools import CATALOG


def training_module(tool: str):
    return importlib.import_module(f"mosmedai_training.{CATALOG[tool].family.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "evaluate", "cards"))
    parser.add_argument("--tool", default="all", choices=("all", *CATALOG))
    parser.add_argument("--n", type=int, default=None, help="held-out cases (default: each family's)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--version", type=int, default=1, help="the tool version (default 1)")
    args = parser.parse_args(argv)
    tools = list(CATALOG) if args.tool == "all" else [args.tool]
    if args.command == "cards":
        for tool in tools:
            module = training_module(tool)
            for version in CATALOG[tool].versions:
                evaluation = args.repository / CATALOG[tool].ensemble(version) / "evaluation.json"
                module.write_card(tool, json.loads(evaluation.read_text()), args.repository)
                print(f"{tool} version {version}: card rewritten from {evaluation}", flush=True)
        return 0
    if args.version != 1:
        if args.tool == "all":
            parser.error("--version other than 1 needs --tool NAME")
        if args.version not in CATALOG[args.tool].versions:
            parser.error(f"tool {args.tool} has no version {args.version} in the catalog "
                         f"(versions: {list(CATALOG[args.tool].versions)}); add it to ToolSpec.versions first")
    families: dict[str, list[str]] = {}
    for tool in tools:
        families.setdefault(CATALOG[tool].family.name, []).append(tool)
    for family, members in families.items():
        module = importlib.import_module(f"mosmedai_training.{family}")
        versioned = {"version": args.version} if args.version != 1 else {}
        if versioned and "version" not in inspect.signature(module.train).parameters:
            parser.error(f"family {family} trains version 1 only")
        started = time.perf_counter()
        if args.command == "train":
            module.train(members, args.repository, **versioned)
        else:
            for tool in members:
                kwargs = {} if args.n is None else {"n": args.n}
                module.write_card(tool, module.evaluate(tool, args.repository, **kwargs, **versioned), args.repository)
        print(f"{family}: {args.command} {members} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
