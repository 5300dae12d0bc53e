"""What each fine-tuning method learns, what it breaks, and what it costs.

    python benchmarks/finetune.py [--examples 20] [--concept-n 100] [--drift-n 500]
        [--sections 123] [--json finetune.json]

The concept is the novel "heart" (`sdscratch.shapes.scenes.NOVEL_SHAPES`): a shape the
bundled latent model never saw and a word its tokenizer never saw. Every method
learns it from the same `--examples` rendered hearts (one object each, in the six
base colours, both sizes, every position; `concept_scenes(seed=0)`), captioned as the
training captions are ("a large red heart at the top"; for textual inversion the new
token stands for the word: "a large red <heart> at the top"). One CPU thread.

Every image: 20 DDIM steps, guidance 7.5, all the noise from one generator seeded
with 0; the bundled judge (which knows the heart) reads it.

1. The table, 400 steps each. Per method (textual inversion with 1 and 4 vectors;
   LoRA on the UNet's attention projections with rank 1, 4, 16 and alpha = rank,
   without and with prior preservation, rank 4 with alpha 1 and 16, and on the
   cross-attention's keys and values alone; DreamBooth with either prior; full
   fine-tuning without). Prior preservation (Ruiz et al. 2023's loss) with
   400 pictures trained on beside the examples: DreamBooth's class images (the base
   model's own pictures of base training captions, "own") or real training pictures
   ("real"); a LoRA trained on the own pictures alone, with no concept at all, shows
   how much fine-tuning on them drifts by itself:
   concept accuracy (`--concept-n` held-out heart prompts, `concept_scenes(seed=1)`:
   every attribute right, and the shape alone), drift (prompt accuracy and FID on
   `--drift-n` base test prompts, against the base model's), trainable parameters,
   file size, CPU seconds of training.
2. Accuracy and drift against training steps, for LoRA rank 4 and DreamBooth (both
   with prior preservation): each step count a run of its own (its own
   learning-rate schedule); and against the LoRA's scale at inference.
3. Merging, measured: a LoRA merged into the weights against the unmerged LoRA
   (largest difference of the UNet's output); the weighted sum of the base and
   the DreamBooth UNet at several alphas (concept accuracy falls, drift shrinks);
   two LoRAs at once (the heart and the novel colour pink: "a pink heart").
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script
from safetensors.torch import save_file

from sdscratch.finetune import finetune
from sdscratch.lora import count_parameters
from sdscratch.lora_files import save_lora
from sdscratch.merge import merge_models
from sdscratch.pipeline import StableDiffusion
from sdscratch.shapes.concepts import (
    Drift,
    concept_set,
    generate,
    prior_images,
    training_prior,
    with_token,
)
from sdscratch.shapes.judge import attribute_accuracy
from sdscratch.textual_inversion import save_embedding

TOKEN = "<heart>"
PRIOR = 400  # pictures trained on beside the examples (prior preservation)
KV = ("attn2.to_k", "attn2.to_v")  # the cross-attention's keys and values
TI = dict(token=TOKEN, init_token="circle", lr=5e-2)
# (name, method, options): the table's runs; prior: "own" (DreamBooth's class
# images, the base model's pictures) or "real" (training pictures)
RUNS = (
    ("textual inversion, 1 vector", "textual_inversion", dict(TI, num_vectors=1)),
    ("textual inversion, 4 vectors", "textual_inversion", dict(TI, num_vectors=4)),
    ("LoRA r1 a1", "lora", dict(rank=1, alpha=1)),
    ("LoRA r4 a4", "lora", dict(rank=4, alpha=4)),
    ("LoRA r16 a16", "lora", dict(rank=16, alpha=16)),
    ("LoRA r4 a4 + own prior", "lora", dict(rank=4, alpha=4, prior="own")),
    ("LoRA r1 a1 + real prior", "lora", dict(rank=1, alpha=1, prior="real")),
    ("LoRA r4 a4 + real prior", "lora", dict(rank=4, alpha=4, prior="real")),
    ("LoRA r16 a16 + real prior", "lora", dict(rank=16, alpha=16, prior="real")),
    ("LoRA r4 a1 + real prior", "lora", dict(rank=4, alpha=1, prior="real")),
    ("LoRA r4 a16 + real prior", "lora", dict(rank=4, alpha=16, prior="real")),
    ("LoRA r4 K,V + real prior", "lora",
     dict(rank=4, alpha=4, targets=KV, prior="real")),
    ("DreamBooth, own prior", "dreambooth", dict(lr=3e-4, prior="own")),
    ("DreamBooth, real prior", "dreambooth", dict(lr=3e-4, prior="real")),
    ("full (no prior)", "full", dict(lr=3e-4)),
)  # fmt: skip
STEPS = 400
CURVES = ("LoRA r4 a4 + real prior", "DreamBooth, real prior")  # against steps


def base_pipe() -> StableDiffusion:
    return StableDiffusion.from_pretrained("shapes-ldm")


def measure_fn(concept_n, drift_n):
    """pipe, textual_inversion=False -> concept accuracy and drift figures."""
    drift = Drift(concept_n, drift_n)

    def measure(pipe, token=False):
        return drift(pipe, "heart", TOKEN) if token else drift(pipe)

    measure.drift = drift
    return measure


def file_size(method, trained, pipe) -> int:
    """Bytes of the file the method shares: an embedding, a LoRA, a UNet (fp16)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.safetensors"
        if method == "textual_inversion":
            save_embedding(trained.vectors.detach(), TOKEN, path)
        elif method == "lora":
            save_lora(trained, path, dtype=torch.float16)
        else:
            state = {k: v.half() for k, v in pipe.unet.state_dict().items()}
            save_file(state, str(path))
        return path.stat().st_size


def train(method, options, steps, examples, priors=None, seed=0) -> tuple:
    """A fresh base pipeline fine-tuned: (pipe, trained, CPU seconds).

    Args:
        options: `finetune`'s; prior="own" or "real": with that one of `priors`.
    """
    images, captions = examples
    if method == "textual_inversion":
        captions = with_token(captions, "heart", TOKEN)
    options = dict(options)
    prior = priors[options.pop("prior")] if "prior" in options else None
    pipe = base_pipe()
    start = time.process_time()
    trained, _ = finetune(pipe, method, images, captions, steps=steps, seed=seed,
                          prior=prior, **options)  # fmt: skip
    return pipe, trained, time.process_time() - start


def trainable(method, trained) -> int:
    if method == "textual_inversion":
        return trained.vectors.numel()
    return count_parameters(trained.parameters())  # a LoRA's A and B, or the UNet


def table(measure, examples, priors) -> list:
    base = {"name": "base model", **measure(base_pipe())}
    rows = [base]
    print(row_text(base))
    for name, method, options in RUNS:
        pipe, trained, cpu = train(method, options, STEPS, examples, priors)
        row = {"name": name, "steps": STEPS, "cpu_seconds": cpu,
               **measure(pipe, token=method == "textual_inversion"),
               "trainable": trainable(method, trained),
               "bytes": file_size(method, trained, pipe)}  # fmt: skip
        row["drift"] = row["base_accuracy"] - base["base_accuracy"]
        rows.append(row)
        print(row_text(row), flush=True)
    for prior in ("own", "real"):  # no heart: what fine-tuning on them alone does
        rows.append(alone(measure, priors, prior, base))
    return rows


def alone(measure, priors, prior, base) -> dict:
    """A LoRA trained on a prior's pictures alone, as if they were the examples."""
    pipe, _, cpu = train("lora", dict(rank=4, alpha=4), STEPS, priors[prior])
    row = {"name": f"LoRA r4 a4 on the {prior} prior alone", "cpu_seconds": cpu,
           **measure(pipe)}  # fmt: skip
    row["drift"] = row["base_accuracy"] - base["base_accuracy"]
    print(row_text(row), flush=True)
    return row


def row_text(row) -> str:
    def pct(key):
        return f"{100 * row[key]:6.1f} %" if key in row else " " * 8

    extra = ""
    if "trainable" in row:
        extra = (f"{row['trainable']:>10,} {row['bytes'] / 1e3:>9.1f} kB "
                 f"{row['cpu_seconds']:>6.0f} s")  # fmt: skip
    return (f"{row['name']:<30} {pct('concept')} {pct('concept_shape')} "
            f"{pct('base_accuracy')} {row['fid']:7.2f} {extra}")  # fmt: skip


def curve(measure, examples, priors, counts=(50, 100, 200, 400, 800)) -> dict:
    """Concept accuracy and drift against steps (each count a run of its own), and
    against the LoRA's scale at inference."""
    result = {}
    runs = [run for run in RUNS if run[0] in CURVES]
    for name, method, options in runs:
        result[name] = []
        for steps in counts:
            pipe, trained, cpu = train(method, options, steps, examples, priors)
            row = {"name": f"{name}, {steps} steps", "steps": steps,
                   "cpu_seconds": cpu, **measure(pipe)}  # fmt: skip
            result[name].append(row)
            print(row_text(row), flush=True)
    pipe, lora, _ = train("lora", runs[0][2], STEPS, examples, priors)  # LoRA's
    result["LoRA scale"] = []
    for scale in (0.25, 0.5, 0.75, 1.0, 1.25):
        lora.scale = scale
        row = {"name": f"LoRA r4 a4 + real prior, scale {scale}", "scale": scale,
               **measure(pipe)}  # fmt: skip
        result["LoRA scale"].append(row)
        print(row_text(row), flush=True)
    return result


def merging(measure, examples, priors) -> dict:
    """Merged LoRA = unmerged; weighted sums of base and DreamBooth; two LoRAs."""
    pipe, lora, _ = train("lora", dict(rank=4, alpha=4, prior="real"), STEPS,
                          examples, priors)  # fmt: skip
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = pipe.text_encoder(pipe.tokenizer(["a large red heart"] * 2))
    t = torch.tensor([500, 100])
    with torch.no_grad():
        hooked = pipe.unet(latents, t, context)
        lora.merge()
        merged = pipe.unet(latents, t, context)
    result = {"merged_vs_unmerged": (hooked - merged).abs().max().item()}
    booth, _, _ = train("dreambooth", dict(lr=3e-4, prior="real"), STEPS,
                        examples, priors)  # fmt: skip
    result["weighted_sum"] = []
    for alpha in (0.25, 0.5, 0.75, 1.0):
        mixed = base_pipe()
        mixed.unet = merge_models(mixed.unet, booth.unet, alpha=alpha)
        row = {"name": f"(1 - {alpha}) base + {alpha} DreamBooth", **measure(mixed)}
        result["weighted_sum"].append(row)
        print(row_text(row), flush=True)
    lora.unmerge()
    result["two_loras"] = two_loras(measure, examples, lora, priors)
    return result


def two_loras(measure, examples, heart, priors) -> list:
    """The heart LoRA and a pink LoRA (learned from pink circles, squares, ...),
    each alone and both at once, on "a pink heart" prompts (N = concept-n)."""
    images, captions, _ = concept_set(len(examples[0]), seed=0, shape=None,
                                      colour="pink")  # fmt: skip
    options = dict(rank=4, alpha=4, prior="real")
    _, pink, _ = train("lora", options, STEPS, (images, captions), priors)
    _, prompts, attrs = concept_set(len(measure.drift.concept), 1, colour="pink")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = {"heart": Path(folder) / "heart.safetensors",
                 "pink": Path(folder) / "pink.safetensors"}  # fmt: skip
        save_lora(heart, files["heart"])
        save_lora(pink, files["pink"])
        for names in (("heart",), ("pink",), ("heart", "pink")):
            pipe = base_pipe()
            for name in names:
                pipe.load_lora_weights(files[name])
            images = generate(pipe, prompts)
            right = attribute_accuracy(images, attrs, measure.drift.judge)
            row = {"name": " + ".join(names), "pink_heart": right["scene"],
                   "shape": right["shape"], "colour": right["colour"]}  # fmt: skip
            rows.append(row)
            print(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--concept-n", type=int, default=100)
    parser.add_argument("--drift-n", type=int, default=500)
    parser.add_argument("--sections", default="123")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    images, captions, _ = concept_set(args.examples, seed=0)
    examples = (images, captions)
    measure = measure_fn(args.concept_n, args.drift_n)
    priors = {"own": prior_images(base_pipe(), PRIOR), "real": training_prior(PRIOR)}
    print(f"{'':<30} {'concept':>8} {'shape':>8} {'base':>8} {'FID':>7}")
    result = {"machine": machine()}
    if "1" in args.sections:
        result["table"] = table(measure, examples, priors)
    if "2" in args.sections:
        result["curve"] = curve(measure, examples, priors)
    if "3" in args.sections:
        result["merging"] = merging(measure, examples, priors)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
