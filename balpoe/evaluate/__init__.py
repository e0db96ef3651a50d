"""Evaluation: logits computed once (:mod:`~balpoe.evaluate.logits`), metrics (accuracy,
many/medium/few, ECE, MCE, NLL, Brier), post-hoc calibration (TS, BCTS), reliability diagrams,
reports, and ``balpoe eval`` (:mod:`~balpoe.evaluate.build`)."""
