"""Reference chest X-ray models: synthetic radiographs, training, export and held-out evaluation.

The phantoms themselves live in ``mosmedai.phantoms`` (no torch; the serving side uses
them too), and so do the seeds of the data splits, re-exported here: phantom i of a split is
``make_phantom((SPLIT_SEED, i))``; the splits differ in the first entry of the seed
sequence, so no phantom is in two splits.
"""

from dataclasses import dataclass

from mosmedai.phantoms import CALIBRATION_SEED, HELD_OUT_SEED, TEST_SEED, TRAIN_SEED  # noqa: F401 (re-exported)


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
