"""Training objectives: pure functions `loss(nets, batch, rng, step, cfg) -> LossOutput`."""
from cud_tf.objectives import cud, disback, onestep, rectified_flow, tract
from cud_tf.objectives.common import LossOutput, Nets, ObjectiveConfig

OBJECTIVES = {"rf": rectified_flow.loss, "cud": cud.loss, "onestep": onestep.loss, "tract": tract.loss,
              "disback_degradation": disback.degradation_loss, "disback": disback.loss,
              "disback_fake": disback.fake_loss}
