"""The Shapes world: the course's dataset, and what measures models on it.

Stable Diffusion's parts (the rest of `sdscratch`) know nothing of Shapes; this
package builds on them, and the recipes build on both.

    scenes     what a picture holds, and drawing a random scene
    captions   writing a scene's caption (two grammars) and parsing one back
    data       the renderer and the dataset (`Shapes`); re-exports scenes, captions
    judge      the attribute classifier that reads generated images, prompt accuracy
    evaluate   prompt accuracy, FID and CLIP score of a text-to-image model
    zero_shot  the tiny CLIP's zero-shot accuracy on Shapes scenes
    outline    the outline measure: each object's pixels against the ideal outlines
    controls   ControlNet's control images (outline, mask), drawn from the scenes
    labels     hand labels of generated images, and a reader's agreement with them
    shards     Shapes scenes as webdataset tar shards (`sdscratch data shards`)
"""
