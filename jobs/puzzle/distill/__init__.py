"""Distillation: blockwise local distillation of a stage's blocks (:mod:`puzzle.distill.bld`) and global
knowledge distillation of an assembled child (:mod:`puzzle.distill.gkd`), both on the one training loop of
:mod:`puzzle.training`."""
