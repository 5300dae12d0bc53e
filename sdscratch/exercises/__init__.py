"""Checks for the lessons' exercises: the learner's function against the package's.

Each `check_<name>(fn)` calls `fn` on a few seeded random inputs, compares what it
returns with what the package computes, and prints one sentence: that it is right,
or what looks wrong, with a hint. It never raises. The signature the learner
writes is in each check's docstring.

In a lesson, an exercise is a cell holding only the learner's function (its
solution between `# BEGIN SOLUTION` and `# END SOLUTION`; it takes what it needs
as arguments and may use `math`, `torch` and `torch.nn.functional as F`), then a
cell calling `exercises.check_<name>(function)`.
"""

from sdscratch.exercises.compare import NOT_DONE
from sdscratch.exercises.diffusion import (
    check_add_noise,
    check_ddim_step,
    check_ddpm_step,
    check_diffusion_loss,
    check_guidance,
    check_img2img_start,
    check_inpaint_blend,
    check_karras_sigmas,
    check_snr,
)
from sdscratch.exercises.networks import (
    check_attention,
    check_contrastive_loss,
    check_kl,
    check_matrix_sqrt,
    check_merge_pair,
    check_reparameterize,
    check_resblock,
    check_timestep_embedding,
)

__all__ = [
    "NOT_DONE",
    "check_add_noise",
    "check_attention",
    "check_contrastive_loss",
    "check_ddim_step",
    "check_ddpm_step",
    "check_diffusion_loss",
    "check_guidance",
    "check_img2img_start",
    "check_inpaint_blend",
    "check_karras_sigmas",
    "check_kl",
    "check_matrix_sqrt",
    "check_merge_pair",
    "check_reparameterize",
    "check_resblock",
    "check_snr",
    "check_timestep_embedding",
]
