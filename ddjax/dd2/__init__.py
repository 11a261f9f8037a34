"""DD2: conditional score distillation (networks `model`, stages `train`, samplers `sampling`)."""
