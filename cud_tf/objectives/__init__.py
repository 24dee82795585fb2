"""Training objectives: pure functions `loss(nets, batch, rng, step, cfg) -> LossOutput`."""
from cud_tf.objectives import cud, rectified_flow
from cud_tf.objectives.common import LossOutput, Nets, ObjectiveConfig

OBJECTIVES = {"rf": rectified_flow.loss, "cud": cud.loss}
