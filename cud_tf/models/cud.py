"""The model of Catch-Up Distillation and its rectified-flow baseline (Shao et al. 2023, arXiv 2305.10769).

The objectives (`cud_tf.objectives.cud`, `rectified_flow`) do the work; the model only keeps the catch-up
network current when the catch-up targets come from the EMA weights (`catchup_model="ema"`).
"""
from cud_tf.models.base import DiffusionModel


class CudModel(DiffusionModel):
    """DiffusionModel with `nets.catchup` = the EMA weights, refreshed before each step when the objective's
    config asks for the EMA as catch-up model (otherwise the catch-up slope uses the trained weights)."""

    def prepare_step(self):
        if self.objective_cfg.catchup_model == "ema":
            self.sync_ema()
