"""Healing a converted model: distillation from its source (`run`, `loop`, `losses`), the local
layer-wise stage (`local`), training data (`data`) and durable state (`state`)."""
