"""judge: the attribute classifier that scores generated images (sdscratch.shapes).

Trained on real Shapes images, each mildly degraded (blur, colour shift, noise) so that
it stays fair to generated ones; checked on test scenes, which it never saw.
"""

import torch

from sdscratch.checkpoint import save_component
from sdscratch.recipes.common import (
    mean_of_last,
    recipe,
    saving,
    scenes_seed,
    seeded,
)
from sdscratch.shapes.data import Shapes, collate
from sdscratch.shapes.judge import (
    Judge,
    JudgeConfig,
    attribute_accuracy,
    degrade,
    judge_loss,
)
from sdscratch.train import fit, rank_generator

JUDGE_STEPS, JUDGE_BATCH, JUDGE_LR = 600, 128, 3e-3
JUDGE_HELDOUT = 10_000  # test scenes the accuracy is measured on
JUDGE_IMAGE_SIZE = 32  # the size it reads: the latent model's images
JUDGE_NOVEL = True  # whether it also learns the novel heart and pink (fine-tuning's)


@recipe("judge", default_out="shapes-judge")
def train_judge(out, seed, steps, checkpoint=None):
    """The attribute judge: `fit` on degraded training scenes, then its accuracy on
    the first JUDGE_HELDOUT test scenes, as they are and degraded."""
    config = JudgeConfig(image_size=JUDGE_IMAGE_SIZE, novel=JUDGE_NOVEL)
    with seeded(seed):  # the initial weights
        judge = Judge(config)
    scenes = scenes_seed("judge", seed)
    train = Shapes("train", JUDGE_IMAGE_SIZE, scenes, novel=JUDGE_NOVEL)
    order = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=JUDGE_BATCH,
        shuffle=True,
        collate_fn=collate,
        generator=order,
    )
    noise = rank_generator(seed + 1)  # each process its own degradations

    def loss_fn(model, batch):
        images, _, scenes = batch
        return judge_loss(model, degrade(images, noise), scenes)

    steps = steps or JUDGE_STEPS
    losses = fit(judge, loss_fn, loader, steps, lr=JUDGE_LR, warmup=50, desc="judge",
                 generators=[order, noise], **saving(checkpoint))  # fmt: skip
    save_component(judge, out / "judge", config)
    test_seed = scenes_seed("judge", seed, "eval")
    test = Shapes("test", JUDGE_IMAGE_SIZE, test_seed, JUDGE_HELDOUT, novel=JUDGE_NOVEL)
    images, _, scenes = test.batch(range(JUDGE_HELDOUT))
    degraded = degrade(images, torch.Generator().manual_seed(seed + 2))
    accuracy = _rounded(attribute_accuracy(images, scenes, judge))
    accuracy_degraded = _rounded(attribute_accuracy(degraded, scenes, judge))
    return {
        "steps": steps,
        "final_loss": round(mean_of_last(losses, 20), 5),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "heldout": f"the first {JUDGE_HELDOUT:,} scenes of the test split",
        "heldout_accuracy": accuracy,
        "heldout_accuracy_degraded": accuracy_degraded,
    }


def _rounded(values: dict, digits=4) -> dict:
    return {key: round(value, digits) for key, value in values.items()}
