"""Synthetic studies without torch: a phantom image per tool family with its findings, and the
DICOM objects around them (``dicom_build``). The CLI's `example`, the bench, the load tests,
the engine build and the tests use them; the training package (``mosmedai_training``) trains
and evaluates on them.

May import catalog and jobs.

Seeds of the data splits (``mosmedai_training`` re-exports them). Phantom i of a split is
``make_phantom((SPLIT_SEED, i))``; the splits differ in the first entry of the seed
sequence, so no phantom is in two splits.
"""

#: Training set of the networks.
TRAIN_SEED = 1001
#: Calibration split: Platt scaling and the suggested operating threshold are fitted here.
CALIBRATION_SEED = 2002
#: Held-out split: the metrics of the model cards (evaluation.json, MODEL_CARD.md).
HELD_OUT_SEED = 3003
#: Fresh split used only by the quality tests (tests/services/serving/test_models_quality.py).
TEST_SEED = 4004
