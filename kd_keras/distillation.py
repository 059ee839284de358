"""kd_keras' losses in the shape of `keras.distillation`: for `keras.distillation.Distiller`.

`keras.distillation.Distiller(teacher, student, distillation_losses=SimRegLoss(), ...)` then
trains single-teacher SimReg: `student` must end in the prediction head (its output [B, d] the
teacher's size), `teacher` must take the same images and give pooled features [B, d]. The
Distiller has no views and no weight decay of its own; `kd_keras.SimReg` is the full method
(several teachers, the paper's views, coupled weight decay) and gives the same loss and
updates on the same batches (tests/test_distillation.py).
"""

import keras

from kd_keras import losses


@keras.saving.register_keras_serializable(package="kd_keras")
class SimRegLoss(keras.distillation.DistillationLoss):
    """SimReg's loss between the final outputs: mean over the batch of ||s/|s| - t/|t|||^2.

    Keras' order (teacher first), unlike `kd_keras.losses.simreg_loss(prediction, target)`.

    Args:
      variant: "simreg" (normalised; the paper's) or "regress" (unnormalised baseline).
    """

    teacher_layer_name = None
    student_layer_name = None

    def __init__(self, variant="simreg"):
        if variant not in ("simreg", "regress"):
            raise ValueError(f"SimRegLoss(variant={variant!r}): use 'simreg' or 'regress'.")
        self.variant = variant

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Both [B, d] with the same d (a 4-D teacher output needs pooling first)."""
        for name, out in (("teacher", teacher_outputs), ("student", student_outputs)):
            if len(out.shape) != 2:
                raise ValueError(
                    f"SimRegLoss needs [batch, dim] outputs; the {name} gives {tuple(out.shape)}"
                    + (" (pool its feature maps)." if len(out.shape) == 4 else ".")
                )
        if teacher_outputs.shape[-1] != student_outputs.shape[-1]:
            raise ValueError(
                f"SimRegLoss: the student outputs {student_outputs.shape[-1]} features and the "
                f"teacher {teacher_outputs.shape[-1]}; end the student in a prediction head to "
                "the teacher's size."
            )

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """Scalar float32 loss; gradients reach the student only."""
        if self.variant == "regress":
            return losses.regress_loss(student_outputs, teacher_outputs)
        return losses.simreg_loss(student_outputs, teacher_outputs)

    def get_config(self):
        return {"variant": self.variant}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
