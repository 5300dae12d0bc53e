import base64
import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sdscratch.viz import (  # noqa: E402
    LESSON_DPI,
    MIN_FONTSIZE,
    from_pil,
    image_grid,
    lesson_style,
    make_grid,
    pipeline_map,
    to_pil,
)


def test_pil_round_trip_is_exact_on_the_uint8_grid():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 5, 7), generator=g).float()
    images = pixels / 127.5 - 1
    back = from_pil(to_pil(images))
    torch.testing.assert_close(back, images, atol=1e-6, rtol=0)
    assert to_pil(images)[0].size == (7, 5)


def test_make_grid_places_each_image_in_its_tile():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 0.5)])
    grid = make_grid(images, ncols=2, pad=1)
    assert grid.shape == (3, 9, 9)
    assert torch.all(grid[:, :4, :4] == -1) and torch.all(grid[:, :4, 5:] == 0)
    assert torch.all(grid[:, 5:, :4] == 0.5) and torch.all(grid[:, 5:, 5:] == 1)
    assert torch.all(grid[:, 4, :] == 1), "padding row is white"


def test_image_grid_draws_every_image_and_caption():
    images = torch.linspace(-1, 1, 5)[:, None, None, None].expand(5, 3, 8, 8)
    captions = [f"caption number {i} which is rather long" for i in range(5)]
    fig = image_grid(images, captions, ncols=3)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 5
    assert [ax.get_title().replace("\n", " ") for ax in drawn] == captions
    shown = np.asarray(drawn[-1].images[0].get_array())
    assert shown.dtype == np.uint8 and shown.max() == 255


def test_image_grid_keeps_a_captions_own_line_breaks():
    caption = "a big blue star above a little green cross\nseed 0, w = 1"
    fig = image_grid(torch.zeros(1, 3, 8, 8), [caption], size=2.4)
    lines = fig.axes[0].get_title().split("\n")
    assert lines[-1] == "seed 0, w = 1" and len(lines) == 3


def test_image_grid_needs_one_caption_per_image():
    with pytest.raises(ValueError, match="Got 1 captions for 3 images"):
        image_grid(torch.zeros(3, 3, 4, 4), ["only one"])


def test_image_grid_captions_sit_below_their_images():
    fig = image_grid(torch.zeros(2, 3, 8, 8), ["one", "two"], size=1.1)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if ax.images:
            image_bottom = ax.get_window_extent(renderer).y0
            assert ax.title.get_window_extent(renderer).y1 <= image_bottom + 0.5


def test_image_grid_captions_are_ten_pixels_high_at_80_dpi():
    """9-point captions: 10 px at the lessons' 80 dpi, the smallest text one reads."""
    fig = image_grid(torch.zeros(2, 3, 8, 8), ["one", "two"])
    sizes = [ax.title.get_fontsize() for ax in fig.axes if ax.images]
    assert min(sizes) * 80 / 72 >= 10


def test_pipeline_map_labels_the_shapes_it_is_given():
    fig = pipeline_map("(1, 32, 96)", "4×8×8", "3×64×64")
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert "(1, 32, 96)" in texts
    assert any("4×8×8" in text for text in texts)
    assert any("3×64×64" in text for text in texts)
    assert all(text.get_fontsize() * 80 / 72 >= 10 for text in fig.axes[0].texts)


def test_image_grid_labels_rows_left_and_columns_above_the_images():
    fig = image_grid(
        torch.zeros(6, 3, 8, 8),
        ncols=3,
        rows=["seed 1", "seed 2"],
        cols=["a", "b", "c"],
    )
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    grid = np.array([ax for ax in fig.axes if ax.images]).reshape(2, 3)
    for row, label in zip(grid, ["seed 1", "seed 2"]):
        (text,) = [t for t in row[0].texts if t.get_text() == label]
        box, image = (
            text.get_window_extent(renderer),
            row[0].get_window_extent(renderer),
        )
        assert box.x1 <= image.x0 and image.y0 < (box.y0 + box.y1) / 2 < image.y1
        assert box.x0 >= 0, "the label is inside the figure"
    for ax, label in zip(grid[0], ["a", "b", "c"]):
        (text,) = [t for t in ax.texts if t.get_text() == label]
        box, image = text.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.y0 >= image.y1 and image.x0 < (box.x0 + box.x1) / 2 < image.x1
        assert box.y1 <= fig.bbox.y1, "the label is inside the figure"


def test_image_grid_needs_one_label_per_row_and_column():
    with pytest.raises(ValueError, match="Got 1 row labels for 2 rows"):
        image_grid(torch.zeros(4, 3, 4, 4), ncols=2, rows=["one"])
    with pytest.raises(ValueError, match="Got 3 column labels for 2 columns"):
        image_grid(torch.zeros(4, 3, 4, 4), ncols=2, cols=["a", "b", "c"])


@pytest.fixture
def notebook_shell():
    """An IPython shell, as in a notebook; matplotlib's settings restored after."""
    from IPython.core.interactiveshell import InteractiveShell

    saved = dict(matplotlib.rcParams)
    shell = InteractiveShell.instance()
    yield shell
    matplotlib.rcParams.update(saved)
    InteractiveShell.clear_instance()


def test_lesson_style_saves_figures_at_twice_the_pixels_with_readable_text(
    notebook_shell,
):
    from PIL import Image

    matplotlib.rcParams.update({"font.size": 6, "xtick.labelsize": "small"})
    lesson_style()
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1], [0, 1], label="a line")
    ax.set(title="a title", xlabel="x", ylabel="y")
    ax.legend()
    data, metadata = notebook_shell.display_formatter.format(fig)
    png = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
    shown = metadata["image/png"]  # the size the notebook and the website show
    assert (png.width // 2, png.height // 2) == (shown["width"], shown["height"])
    assert abs(shown["width"] - 4 * LESSON_DPI) < 0.25 * 4 * LESSON_DPI  # tight box
    fig.canvas.draw()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert len(texts) >= 6  # ticks, labels, title, legend
    assert min(t.get_fontsize() for t in texts) >= MIN_FONTSIZE
    assert MIN_FONTSIZE * LESSON_DPI / 72 >= 10  # points at the dpi: pixels
    plt.close(fig)


def test_pipeline_map_labels_cross_no_other_label_and_no_frame():
    """Each label overlaps no other, and lies inside or outside each box and frame."""
    fig = pipeline_map("(1, 32, 96)", "4×8×8", "3×32×32")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t.get_window_extent(renderer) for t in fig.axes[0].texts if t.get_text()]
    frames = [patch.get_window_extent(renderer) for patch in fig.axes[0].patches]
    assert len(texts) >= 15 and len(frames) >= 7
    for i, box in enumerate(texts):
        for other in texts[i + 1 :]:
            assert not box.overlaps(other), (box, other)
        for frame in frames:
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1
            inside = inside and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert inside or not box.overlaps(frame), (box, frame)
