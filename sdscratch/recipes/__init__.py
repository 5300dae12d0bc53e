"""The recipes that made every checkpoint in assets/models/, one module each.

A recipe is a function registered with `@recipe("name")`; `python -m sdscratch train
NAME` runs it through `run_recipe`, which times it and writes the checkpoint's
MANIFEST.json (command, seed, wall and CPU time, threads, load, sha256 of every file,
measured quality). A recipe takes `(out, seed, steps)`: the folder to write, the seed
for every random draw, and an optional override of its number of training steps (for
short runs and tests); it returns the quality it measured, as a dict. Together the
core recipes (all but controlnet and heart-lora) run in 60 minutes or less on a 2-core
CPU; an extension recipe (controlnet, heart-lora) takes at most 10 CPU minutes on top
of its base.

    common  the registry, `run_recipe`, threads, seeds and the manifest's keys
    judge   shapes-judge, the attribute classifier of sdscratch.shapes.judge
    vae     shapes-vae, the autoencoder of the latent model
    clip    shapes-clip, the tokenizer, text encoder and image encoder
    pixel   shapes-pixel-uncond and shapes-pixel-text, UNets on pixels
    ldm     shapes-ldm, the latent text-to-image model
    controlnet  shapes-controlnet, a ControlNet for shapes-ldm (outlines or masks)
    finetune    shapes-heart-lora, a LoRA that teaches shapes-ldm the novel heart

A recipe's constants live in its module (`sdscratch.recipes.judge.JUDGE_HELDOUT`).
"""

from sdscratch.recipes.clip import clip_configs, train_clip
from sdscratch.recipes.common import (
    MANIFEST_KEYS,
    RECIPE_THREADS,
    RECIPES,
    TRAINED,
    pinned_threads,
    recipe,
    run_recipe,
    scenes_seed,
    seeded,
)
from sdscratch.recipes.controlnet import train_controlnet
from sdscratch.recipes.finetune import train_heart_lora
from sdscratch.recipes.judge import train_judge
from sdscratch.recipes.ldm import (
    LDM_PARTS,
    encode_scenes,
    ldm_unet_config,
    load_ldm_parts,
    measure_ldm,
    train_ldm,
)
from sdscratch.recipes.pixel import (
    guided,
    pixel_text,
    pixel_uncond,
    pixel_unet_config,
    solid_colour_share,
)
from sdscratch.recipes.vae import train_vae

__all__ = [
    "LDM_PARTS",
    "MANIFEST_KEYS",
    "RECIPES",
    "RECIPE_THREADS",
    "TRAINED",
    "clip_configs",
    "encode_scenes",
    "guided",
    "ldm_unet_config",
    "load_ldm_parts",
    "measure_ldm",
    "pinned_threads",
    "pixel_text",
    "pixel_uncond",
    "pixel_unet_config",
    "recipe",
    "run_recipe",
    "scenes_seed",
    "seeded",
    "solid_colour_share",
    "train_clip",
    "train_controlnet",
    "train_heart_lora",
    "train_judge",
    "train_ldm",
    "train_vae",
]
