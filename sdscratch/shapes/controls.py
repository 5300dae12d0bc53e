"""Control images drawn exactly from Shapes scenes, for ControlNet: no detector.

SD's ControlNets are trained on control images a detector made from photographs
(Canny edges, HED boundaries, segmentation maps) and so inherit its mistakes. A Shapes
scene knows its objects, so its controls are drawn from the same signed distance
fields the renderer draws the picture with (`sdscratch.shapes.data`), exactly:

    outline  a white line on black along each object's edge: an edge map. A pixel is
             1 - |d| (0 beyond one pixel), d its signed distance to the edge in
             pixels; so the pixels above 0.5 are exactly those the rendered object
             covers only in part, its anti-aliased boundary.
    mask     each object's silhouette filled white on black: a layout mask. It is
             the renderer's own coverage of each pixel (1 inside, 0 outside, the
             anti-aliased ramp between), the objects' union.

Neither says anything of colour: what a control leaves open, the prompt decides.
Controls are (3, H, W) in [0, 1], the three channels equal, as SD's ControlNets take
their control images.
"""

import numpy as np
import torch

from sdscratch.shapes.data import signed_distances

CONTROLS = ("outline", "mask")


def draw_controls(scenes: list, kind="outline", size=32) -> torch.Tensor:
    """The control images of scenes.

    Args:
        scenes: B attrs dicts (`Shapes(...)[i][2]`, `sample_attrs`).
        kind: "outline" (an edge map) or "mask" (a filled layout mask).
        size: the image side in pixels (the images' the ControlNet steers).
    Returns:
        (B, 3, H, W) float32 in [0, 1]: white on black, the channels equal.
    """
    if kind not in CONTROLS:
        raise ValueError(f"Unknown control {kind!r}; choose one of {list(CONTROLS)}.")
    owners = [b for b, scene in enumerate(scenes) for _ in scene["objects"]]
    objects = [obj for scene in scenes for obj in scene["objects"]]
    distance = signed_distances(objects, size)  # (K, H, W)
    if kind == "outline":
        strokes = np.clip(1.0 - np.abs(distance), 0.0, 1.0)
    else:  # the renderer's coverage: clamp(0.5 - d, 0, 1)
        strokes = np.clip(0.5 - distance, 0.0, 1.0)
    maps = np.zeros((len(scenes), size, size), np.float32)
    np.maximum.at(maps, np.array(owners, dtype=np.int64), strokes)  # the union
    return torch.from_numpy(maps)[:, None].expand(-1, 3, -1, -1).contiguous()


def draw_control(attrs: dict, kind="outline", size=32) -> torch.Tensor:
    """One scene's control image, (3, H, W) in [0, 1]: see `draw_controls`."""
    return draw_controls([attrs], kind, size)[0]
