"""Reference chest X-ray models: synthetic radiographs, training, export and held-out evaluation.

Seeds of the data splits. Phantom i of a split is ``make_phantom((SPLIT_SEED, i))``; the
splits differ in the first entry of the seed sequence, so no phantom is in two splits.
"""

from dataclasses import dataclass

#: Training set of the networks.
TRAIN_SEED = 1001
#: Calibration split: Platt scaling and the suggested operating threshold are fitted here.
CALIBRATION_SEED = 2002
#: Held-out split: the metrics of the model cards (evaluation.json, MODEL_CARD.md).
HELD_OUT_SEED = 3003
#: Fresh split used only by the quality tests (tests/services/test_models_quality.py).
TEST_SEED = 4004


# Versions of the chest X-ray tools (``python -m mosmedai_training.train --version N``):
# the data splits above are the same for every version; what changes is here.
@dataclass(frozen=True)
class Recipe:
    """What a version of a chest X-ray tool is trained with (the data splits are the same)."""

    widths: tuple[int, int, int]
    #: added to TRAIN_SEED + the tool's index for torch's initialisation and batch order
    seed_offset: int
    note: str


RECIPES: dict[int, Recipe] = {
    1: Recipe((12, 24, 48), 0, "the first release"),
    2: Recipe((8, 16, 32), 100, "a slimmer candidate, about half the compute of version 1"),
}
