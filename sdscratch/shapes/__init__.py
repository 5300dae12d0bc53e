"""The Shapes world: the course's dataset, and what measures models on it.

Stable Diffusion's parts (the rest of `sdscratch`) know nothing of Shapes; this
package builds on them, and the recipes build on both.

    data       the procedural dataset: scenes, captions, renderer (`Shapes`)
    judge      the attribute classifier that reads generated images, prompt accuracy
    evaluate   prompt accuracy, FID and CLIP score of a text-to-image model
    zero_shot  the tiny CLIP's zero-shot accuracy on Shapes scenes
    shards     Shapes scenes as webdataset tar shards (`sdscratch data shards`)
"""
