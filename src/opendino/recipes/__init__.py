"""Student-teacher recipes: SSL pretraining (and, with later stages, Gram anchoring and distillation)."""
