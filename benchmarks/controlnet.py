"""How well a ControlNet steers the layout, and what it leaves to the prompt.

    python benchmarks/controlnet.py [--controlnet shapes-controlnet] [--n 500]
        [--sweep-n 200] [--curve-steps 600] [--curve-n 100] [--grid controlnet.png]
        [--sections 1234]

Every image is made with 20 DDIM steps at guidance 7.5, its prompt the canonical
caption of a test scene, its control drawn from the same scene, all the noise from
one generator seeded with 0.

1. Adherence (N test scenes): the mean IoU of the generated objects' pixels with the
   control's shapes (`sdscratch.recipes.controlnet.control_iou`; target ≥ 0.8), the
   share of images whose objects have the colours the prompt names (the bundled
   judge; target ≥ 95 %) and of images right in every attribute. Next to it the
   same figures without the control (the base alone), the IoU with the control
   and the empty prompt (the control alone), and the IoU of the VAE's
   reconstructions of the real scenes: the most a decoder of this VAE can reach.
2. The control-scale sweep (`controlnet_conditioning_scale`, sweep-n scenes).
3. Control against prompt (the one-object test scenes among the first sweep-n):
   the control draws a star where the prompt asks for a circle, and the other way
   round. Which wins, as the outline measure reads each image's shape.
4. The training curve: the recipe run again for curve-steps steps with zero and
   with randomly initialised connections, the IoU (curve-n scenes) at 13 steps.
   Zhang et al. 2023 (§4.4) report a "sudden convergence": the model starts
   following the control within a few steps, rather than gradually.
"""

import argparse
import time

import torch
from _machine import machine  # benchmarks/_machine.py, beside this script

from sdscratch.checkpoint import load_component, read_manifest, resolve
from sdscratch.controlnet import ControlNet, ControlNetConfig
from sdscratch.pipeline import StableDiffusion
from sdscratch.recipes import controlnet as recipe
from sdscratch.shapes.controls import draw_controls
from sdscratch.shapes.data import Shapes, canonical_caption
from sdscratch.shapes.outline import outline_check, read_objects
from sdscratch.viz import make_grid, to_pil

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def test_scenes(n):
    attrs = [Shapes("test").scene(i)[1] for i in range(n)]
    return [canonical_caption(scene) for scene in attrs], attrs


def percent(x) -> str:
    return f"{100 * x:5.1f} %"


def figures(row) -> str:
    """control IoU, colour and prompt accuracy of `recipe.adherence`, one line."""
    colour, prompt = row["colour_accuracy"], row["prompt_accuracy"]
    return f"{row['control_iou']:8.3f}   {percent(colour)}   {percent(prompt)}"


def adherence(pipe, controlnet, control, n, grid=None):
    """Section 1: with the control, without it, and the VAE's reconstructions."""
    captions, attrs = test_scenes(n)
    start = time.process_time()
    images = recipe.generate_steered(pipe, controlnet, captions, attrs, control, 0)
    seconds = (time.process_time() - start) / n
    steered = recipe.adherence(images, attrs)
    real = Shapes("test", length=n).batch(range(n))[0]
    masks = draw_controls(attrs, "mask", real.shape[-1])[:, 0]
    generator = torch.Generator().manual_seed(0)
    plain = torch.cat([
        pipe(captions[i : i + 100], generator=generator, output_type="pt",
             **recipe.CONTROLNET_EVAL_SETTINGS)
        for i in range(0, n, 100)
    ])  # fmt: skip
    alone = recipe.adherence(plain, attrs)
    empty = [""] * n  # the control alone says where and what; colour is free
    iou_empty = recipe.control_iou(
        recipe.generate_steered(pipe, controlnet, empty, attrs, control, 0), masks
    ).mean()
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(real).mean).clamp(-1, 1)
    ceiling = recipe.control_iou(decoded, masks).mean().item()
    print(f"\n1. Adherence, N = {n} test scenes ({seconds:.2f} CPU s per image)")
    print("                       control IoU   colour    prompt (all attributes)")
    for name, row in (("with the control", steered), ("base alone", alone)):
        print(f"  {name:20s} {figures(row)}")
    print(f"  empty prompt         {iou_empty:8.3f}   (the control alone)")
    print(f"  VAE reconstructions  {ceiling:8.3f}   (real scenes encoded, decoded)")
    if grid:
        save_grid(grid, images[:16], draw_controls(attrs[:16], control), plain[:16])
    return steered


def save_grid(path, images, controls, plain):
    """Rows of 8: control, steered image, the base's image without control."""
    rows = []
    for start in (0, 8):
        part = slice(start, start + 8)
        rows += [controls[part] * 2 - 1, images[part], plain[part]]
    picture = make_grid(torch.cat(rows), ncols=8, pad=2)
    side = picture.shape[-1] * 4
    to_pil(picture[None])[0].resize((side, picture.shape[-2] * 4), 0).save(path)
    print(f"  grid: {path} (rows: control, steered, base alone)")


def sweep(pipe, controlnet, control, n):
    """Section 2: the figures against `controlnet_conditioning_scale`."""
    captions, attrs = test_scenes(n)
    print(f"\n2. Control scale, N = {n}")
    print("  scale   control IoU   colour    prompt")
    for scale in SCALES:
        images = recipe.generate_steered(pipe, controlnet, captions, attrs, control,
                                         0, scale)  # fmt: skip
        print(f"  {scale:5.2f}   {figures(recipe.adherence(images, attrs))}")


def conflict(pipe, controlnet, control, n):
    """Section 3: a star drawn, a circle asked (and back); which one is made."""
    _, attrs = test_scenes(n)
    ones = [scene for scene in attrs if len(scene["objects"]) == 1]
    print(f"\n3. Control against prompt, N = {len(ones)} one-object scenes each way")
    print("  drawn    asked     scale   drawn made   asked made   neither")
    for drawn, asked in (("star", "circle"), ("circle", "star")):
        controls = [reshaped(scene, drawn) for scene in ones]
        prompts = [reshaped(scene, asked) for scene in ones]
        captions = [canonical_caption(scene) for scene in prompts]
        for scale in (0.5, 1.0):
            images = recipe.generate_steered(pipe, controlnet, captions, controls,
                                             control, 0, scale)  # fmt: skip
            reads = read_objects(images)
            made = outline_check(images, controls, reads)["shape"].float().mean()
            asked_made = outline_check(images, prompts, reads)["shape"].float().mean()
            shares = (made, asked_made, 1 - made - asked_made)
            print(f"  {drawn:8s} {asked:8s}  {scale:4.1f}   "
                  + "      ".join(percent(share) for share in shares))  # fmt: skip


def reshaped(scene, shape):
    return {**scene, "objects": [dict(obj, shape=shape) for obj in scene["objects"]]}


def curve(pipe, control, steps, n):
    """Section 4: IoU against training step, zero against random connections."""
    captions, attrs = test_scenes(n)
    at = sorted({0, *range(0, steps, max(steps // 12, 1)), steps})
    count = min(recipe.CONTROLNET_SCENES, steps * recipe.CONTROLNET_BATCH)
    data = recipe.encode_scenes(pipe, count, control)
    print(f"\n4. Training curve, control IoU on N = {n} (steps of "
          f"{recipe.CONTROLNET_BATCH} latents)")  # fmt: skip
    print("  step   " + "   ".join(f"{name:>6s}" for name in recipe.CONNECTIONS))
    rows = {step: [] for step in at}
    for connections in recipe.CONNECTIONS:
        controlnet = recipe.make_controlnet(pipe.unet, pipe.vae_scale_factor,
                                            connections)  # fmt: skip

        def measure(step, model):
            if step in rows:
                model.eval()
                images = recipe.generate_steered(pipe, model, captions, attrs, control,
                                                 0)  # fmt: skip
                rows[step].append(recipe.adherence(images, attrs)["control_iou"])
                model.train()

        recipe.fit_controlnet(controlnet, pipe, data, steps, 0, measure)
        measure(steps, controlnet)
    for step, values in rows.items():
        print(f"  {step:4d}   " + "   ".join(f"{v:6.3f}" for v in values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", default="shapes-controlnet")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sweep-n", type=int, default=200)
    parser.add_argument("--curve-steps", type=int, default=600, help="0: skip it")
    parser.add_argument("--curve-n", type=int, default=100)
    parser.add_argument("--grid", help="save a PNG of controls and images here")
    parser.add_argument("--sections", default="1234", help="which to run, e.g. 4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    print(machine())
    folder = resolve(args.controlnet)
    quality = read_manifest(folder)["quality"]
    control, base = quality["control"], quality["base"]
    print(f"ControlNet {folder} ({control}) on {base}")
    pipe = StableDiffusion.from_pretrained(base)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    controlnet = load_component(folder, ControlNet, ControlNetConfig)
    start = time.perf_counter()
    if "1" in args.sections:
        adherence(pipe, controlnet, control, args.n, args.grid)
    if "2" in args.sections:
        sweep(pipe, controlnet, control, args.sweep_n)
    if "3" in args.sections:
        conflict(pipe, controlnet, control, args.sweep_n)
    if "4" in args.sections and args.curve_steps:
        curve(pipe, control, args.curve_steps, args.curve_n)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
