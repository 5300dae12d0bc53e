"""heart-lora: a LoRA that teaches the bundled latent model the novel heart.

Twenty rendered hearts (`sdscratch.shapes.concepts.concept_set`, seed 0: the six base
colours, both sizes, every position), captioned as the base captions are ("a large
red heart at the top"; the word is new to the tokenizer, so it is its own rare
identifier). A rank-4 LoRA on the UNet's attention projections, trained with
prior preservation (Ruiz et al. 2023's loss): beside the examples, 400 real training
pictures with their captions, so that what it drew stays drawn. (DreamBooth's own
class images, the base model's pictures of base captions, keep less:
benchmarks/finetune.py measures both.) The folder written holds
`pytorch_lora_weights.safetensors` (diffusers' format: `sdscratch generate --lora`,
or diffusers' `load_lora_weights`), and the manifest the sha256 of the base UNet it
was trained on.

Its quality: concept accuracy on 100 held-out heart prompts and drift (prompt
accuracy and FID on 500 base test prompts, against the base model's), as
`benchmarks/finetune.py` measures every method; at scale 1 and at LORA_SCALE, the
scale that benchmark's sweep found to keep the heart and lose least of the rest
(`generate --lora FILE:0.75`).
"""

from sdscratch.finetune import finetune
from sdscratch.loading import unet_digest
from sdscratch.lora import count_parameters
from sdscratch.lora_files import save_lora
from sdscratch.pipeline import StableDiffusion
from sdscratch.recipes.common import mean_of_last, recipe, scenes_seed
from sdscratch.shapes.concepts import Drift, concept_set, training_prior

LORA_BASE = "shapes-ldm"
LORA_EXAMPLES = 20  # hearts it learns from
LORA_PRIOR = 400  # real training pictures trained on beside the examples
LORA_STEPS, LORA_RANK, LORA_LR = 400, 4, 1e-2
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_CONCEPT_N, LORA_DRIFT_N = 100, 500  # held-out heart prompts; base prompts
LORA_SCALE = 0.75  # the scale to use it at: the heart as often, the rest kept


@recipe("heart-lora", default_out="shapes-heart-lora")
def train_heart_lora(out, seed, steps):
    """Fine-tune a LoRA on the hearts (with prior preservation), save, measure."""
    pipe = StableDiffusion.from_pretrained(LORA_BASE)
    images, captions, _ = concept_set(LORA_EXAMPLES, scenes_seed("heart-lora", seed))
    prior = training_prior(LORA_PRIOR)
    steps = steps or LORA_STEPS
    lora, losses = finetune(pipe, "lora", images, captions, steps=steps, lr=LORA_LR,
                            seed=seed, prior=prior, rank=LORA_RANK,
                            progress=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_lora(lora, out / LORA_FILE)
    drift = Drift(LORA_CONCEPT_N, LORA_DRIFT_N)
    after = drift(pipe)
    lora.scale = LORA_SCALE
    scaled = drift(pipe)
    lora.detach()
    before = drift(pipe)
    return {
        "steps": steps,
        "final_loss": round(mean_of_last(losses, 20), 5),
        "base": LORA_BASE,
        "base_unet_sha256": unet_digest(LORA_BASE),
        "parameters": count_parameters(lora.parameters()),
        "concept_accuracy": after["concept"],
        "concept_accuracy_before": before["concept"],
        "base_accuracy": after["base_accuracy"],
        "base_accuracy_before": before["base_accuracy"],
        "fid": round(after["fid"], 2),
        "fid_before": round(before["fid"], 2),
        "scale": LORA_SCALE,
        "concept_accuracy_at_scale": scaled["concept"],
        "base_accuracy_at_scale": scaled["base_accuracy"],
        "fid_at_scale": round(scaled["fid"], 2),
        "measured_on": f"{LORA_CONCEPT_N} held-out heart prompts, {LORA_DRIFT_N} "
        "base test prompts; 20 DDIM steps, guidance 7.5, seed 0",
    }
