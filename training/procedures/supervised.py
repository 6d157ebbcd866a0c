"""Plain supervised training of any registered network: the "from scratch" baseline of every paper.

One batch of the target data set per step, ``loss(model(image), target)``, every parameter trained
(parameters a network freezes itself, e.g. the Adapted-encoder of ``hybrid_encoder_unet``, stay frozen:
:meth:`Procedure.param_groups` skips ``requires_grad=False``). Optimiser, schedule, loss, epochs,
iterations per epoch and patch/batch sizes all come from the config, so one procedure reproduces:

- 000/001/002's nnU-Net baseline "training from scratch" (``configs/covid19ctseg_nnunet3d_scratch.yaml``):
  SGD lr 0.01, Nesterov momentum 0.99, poly (1 - epoch/max)^0.9, batch 2, Dice + CE with deep supervision;
- 004's grid runs (Adam 1e-3, Soft Dice, 200 epochs, model selection by validation loss);
- the 2D baselines on the shared slices (``configs/ctseg2d_supervised*.yaml``).

``model.init`` starts from pre-trained weights (an engine checkpoint or a run's ``best.pt``), which is
000's "Body Fine-tuning" when every weight is trained.
"""

from __future__ import annotations

from . import Procedure, register_procedure


@register_procedure
class SupervisedProcedure(Procedure):
    """Supervised training of ``model`` on ``data`` (the hooks' defaults, see :class:`Procedure`)."""

    name = "supervised"
    paper = "wang_hybrid_encoder, zhang_collaborative, bizopoulos_grid"
    summary = "supervised training of any registered network from scratch or from model.init weights"
    options: dict = {}
