"""Checks for the lessons' exercises: the learner's function against the package's.

Each `check_<name>(fn)` calls `fn` on a few seeded random inputs, compares what it
returns with what the package computes, and prints one sentence: that it is right,
or what looks wrong, with a hint. It never raises. The signature the learner
writes is in each check's docstring.

In a lesson, an exercise is a cell holding only the learner's function (its
solution between `# BEGIN SOLUTION` and `# END SOLUTION`; it takes what it needs
as arguments and may use `math`, `torch`, `torch.nn.functional as F` and einops'
`rearrange`), then a cell calling `exercises.check_<name>(function)`.
"""

import contextlib
import io

from sdscratch.exercises.attention import (
    check_causal_softmax,
    check_cross_attention,
    check_split_heads,
    reference_causal_softmax,
    reference_cross_attention,
)
from sdscratch.exercises.checkpoints import (
    check_bytes_in,
    check_compvis_name,
    check_resblock_parameters,
)
from sdscratch.exercises.compare import NOT_DONE
from sdscratch.exercises.control import (
    check_add_control_residuals,
    check_guidance_window,
    check_zero_conv,
    reference_add_control_residuals,
)
from sdscratch.exercises.diffusion import (
    check_add_noise,
    check_ddim_step,
    check_ddpm_step,
    check_diffusion_loss,
    check_downsample_mask,
    check_guidance,
    check_img2img_start,
    check_inpaint_blend,
    check_karras_sigmas,
    check_snr,
    reference_ddim_step,
    reference_ddpm_step,
    reference_diffusion_loss,
    reference_downsample_mask,
)
from sdscratch.exercises.evaluation import (
    check_clip_scores,
    check_frechet_from_stats,
    check_inception_score,
    check_psnr_db,
    reference_inception_score,
)
from sdscratch.exercises.finetune import (
    check_lora_forward,
    check_merge_lora,
    check_prior_preservation_loss,
    check_swap_embeddings,
    reference_lora_forward,
    reference_merge_lora,
    reference_swap_embeddings,
)
from sdscratch.exercises.guidance import check_guided_noise, check_rescale_guidance
from sdscratch.exercises.levels import (
    check_predict_x0,
    check_scaled_linear_betas,
    check_sigmas,
    reference_scaled_linear_betas,
)
from sdscratch.exercises.merging import (
    check_add_difference,
    check_decide,
    check_esd_target,
    check_weighted_sum,
)
from sdscratch.exercises.networks import (
    check_attention,
    check_contrastive_loss,
    check_geglu,
    check_kl,
    check_matrix_sqrt,
    check_merge_pair,
    check_reparameterize,
    check_resblock,
    check_timestep_embedding,
    reference_contrastive_loss,
    reference_kl,
    reference_matrix_sqrt,
    reference_merge_pair,
    reference_reparameterize,
    reference_resblock,
    reference_timestep_embedding,
)
from sdscratch.exercises.scaling import (
    check_mean_gradient,
    check_rank_batch,
    check_shard_split,
)
from sdscratch.exercises.training import (
    check_ema_update,
    check_encode_latents,
    check_min_snr_weight,
)
from sdscratch.merge import weighted_sum
from sdscratch.metrics import frechet_distance_from_stats
from sdscratch.samplers import img2img_start

__all__ = [
    "NOT_DONE",
    "yours_or_ours",
    "check_add_control_residuals",
    "check_add_difference",
    "check_add_noise",
    "check_attention",
    "check_bytes_in",
    "check_causal_softmax",
    "check_clip_scores",
    "check_compvis_name",
    "check_contrastive_loss",
    "check_cross_attention",
    "check_ddim_step",
    "check_ddpm_step",
    "check_decide",
    "check_diffusion_loss",
    "check_downsample_mask",
    "check_ema_update",
    "check_encode_latents",
    "check_esd_target",
    "check_frechet_from_stats",
    "check_inception_score",
    "check_geglu",
    "check_guidance",
    "check_guidance_window",
    "check_guided_noise",
    "check_img2img_start",
    "check_inpaint_blend",
    "check_karras_sigmas",
    "check_lora_forward",
    "check_kl",
    "check_matrix_sqrt",
    "check_mean_gradient",
    "check_merge_lora",
    "check_merge_pair",
    "check_min_snr_weight",
    "check_predict_x0",
    "check_prior_preservation_loss",
    "check_psnr_db",
    "check_rank_batch",
    "check_reparameterize",
    "check_resblock",
    "check_resblock_parameters",
    "check_rescale_guidance",
    "check_scaled_linear_betas",
    "check_shard_split",
    "check_sigmas",
    "check_snr",
    "check_split_heads",
    "check_swap_embeddings",
    "check_timestep_embedding",
    "check_weighted_sum",
    "check_zero_conv",
]

# The package's version of each exercise whose function later cells use, with the
# signature the learner writes.
REFERENCES = {
    "weighted_sum": (weighted_sum, check_weighted_sum),
    "diffusion_loss": (reference_diffusion_loss, check_diffusion_loss),
    "ddpm_step": (reference_ddpm_step, check_ddpm_step),
    "ddim_step": (reference_ddim_step, check_ddim_step),
    "matrix_sqrt": (reference_matrix_sqrt, check_matrix_sqrt),
    "frechet_from_stats": (frechet_distance_from_stats, check_frechet_from_stats),
    "timestep_embedding": (reference_timestep_embedding, check_timestep_embedding),
    "resblock": (reference_resblock, check_resblock),
    "cross_attention": (reference_cross_attention, check_cross_attention),
    "merge_pair": (reference_merge_pair, check_merge_pair),
    "contrastive_loss": (reference_contrastive_loss, check_contrastive_loss),
    "reparameterize": (reference_reparameterize, check_reparameterize),
    "kl": (reference_kl, check_kl),
    "img2img_start": (img2img_start, check_img2img_start),
    "downsample_mask": (reference_downsample_mask, check_downsample_mask),
    "causal_softmax": (reference_causal_softmax, check_causal_softmax),
    "scaled_linear_betas": (reference_scaled_linear_betas, check_scaled_linear_betas),
    "add_control_residuals": (
        reference_add_control_residuals,
        check_add_control_residuals,
    ),
    "swap_embeddings": (reference_swap_embeddings, check_swap_embeddings),
    "lora_forward": (reference_lora_forward, check_lora_forward),
    "merge_lora": (reference_merge_lora, check_merge_lora),
    "inception_score": (reference_inception_score, check_inception_score),
}


def yours_or_ours(fn):
    """`fn` if it passes its check, else the package's version of it.

    A lesson's later cells use the learner's function through this: they run with
    yours once it is right, and with the package's (said in one sentence) until
    then, so an exercise notebook runs top to bottom either way.

    Args:
        fn: the learner's function; its name says which exercise it is.
    """
    name = getattr(fn, "__name__", "")
    if name not in REFERENCES:
        raise ValueError(f"No exercise is called {name!r}; known: {list(REFERENCES)}.")
    reference, check = REFERENCES[name]
    verdict = io.StringIO()
    with contextlib.redirect_stdout(verdict):
        check(fn)
    if "right on all" in verdict.getvalue():
        return fn
    print(
        f"{name}: yours does not pass its check yet, so the cells below use the "
        "package's."
    )
    return reference
