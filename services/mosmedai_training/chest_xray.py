"""Chest X-ray family: the uniform training interface over train.py, evaluate.py and the phantoms.

The three chest X-ray tools were the platform's first; their phantoms
(`mosmedai.phantoms.chest_xray`), training and evaluation live in those modules. This one
gives them the interface every family module has (``mosmedai_training`` drives them all):
train, evaluate, write_card, cases, score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mosmedai.catalog.families import ToolOutput
from mosmedai_training import HELD_OUT_SEED
from mosmedai_training.common import Case
from mosmedai_training.evaluate import auc_score, box_hit, evaluate as _evaluate, sensitivity_specificity
from mosmedai_training.evaluate import write_card as _write_card
from mosmedai.phantoms.chest_xray import TOOLS, generate, to_dataset

#: How far metrics recomputed on ~20 fresh cases may lie from the card's (400 cases): with
#: 10 positives a sensitivity of 0.92 can read 0.7 by chance (binomial 2.5th percentile).
TOLERANCE = {"auc": 0.12, "sensitivity": 0.3, "specificity": 0.3}


def train(tools: list[str], out: Path, version: int = 1) -> None:
    from mosmedai_training import train as cxr_train

    cxr_train.main(["--tool", tools[0] if len(tools) == 1 else "all", "--out", str(out), "--version", str(version)])


def evaluate(tool: str, repository: Path, n: int = 400, seed: int = HELD_OUT_SEED, version: int = 1) -> dict:
    return _evaluate(tool, n=n, seed=seed, repository=repository, version=version)


def write_card(tool: str, result: dict, repository: Path) -> None:
    """evaluation.json and MODEL_CARD.md in the folder of the result's version's ensemble."""
    _write_card(result, Path(repository))


def cases(tool: str, seed: int, n: int) -> list[Case]:
    return [Case([to_dataset(phantom)], {"label": bool(phantom.labels[tool]), "box": phantom.boxes[tool]})
            for phantom in generate(seed, n)]


def score(tool: str, outputs: list[ToolOutput], cases: list[Case]) -> dict:
    labels = np.array([case.truth["label"] for case in cases])
    probability = np.array([output.probability for output in outputs])
    positive = np.array([output.positive for output in outputs])
    sensitivity, specificity, _ = sensitivity_specificity(positive, labels)
    hits = [box_hit(output.location, np.asarray(case.truth["box"], np.float32))
            for output, case in zip(outputs, cases) if output.positive and case.truth["label"]]
    return {"auc": auc_score(probability, labels), "sensitivity": sensitivity, "specificity": specificity,
            "localisation_hit_rate": float(np.mean(hits)) if hits else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "evaluate"))
    parser.add_argument("--tool", default="all", choices=("all", *TOOLS))
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    tools = list(TOOLS) if args.tool == "all" else [args.tool]
    if args.command == "train":
        train(tools, args.repository, args.version)
    else:
        for tool in tools:
            write_card(tool, evaluate(tool, args.repository, args.n, version=args.version), args.repository)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
