"""Training: recipe -> plan (:mod:`~balpoe.training.build`), the stage-agnostic loop
(:mod:`~balpoe.training.trainer`) and MiSLAS stage 2 (:mod:`~balpoe.training.stage2`)."""
