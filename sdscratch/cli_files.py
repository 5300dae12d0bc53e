"""The command line's image files: inputs opened with their size checked before
decoding, outputs written whole under a name that no other file had.

Errors are one ValueError sentence, which `__main__` prints with exit code 2.
"""

import os
import re
import warnings
from pathlib import Path

IMAGE_SIZE_FACTOR = 8  # --init-image and --mask: at most 8× the model's image side


def output_path(args) -> tuple[Path, str]:
    """Where `generate` writes, and PIL's format for it: checked to be writable
    and not to overwrite (nor write through a symlink to nothing)."""
    if args.output is None:
        slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:60]
        args.output = f"{slug or 'image'}-{args.seed}.png"
    out = Path(args.output).expanduser()
    from PIL import Image

    if out.is_dir():
        raise ValueError(f"Cannot write {out}: it is a folder.")
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:  # e.g. .psd: PIL reads it but cannot write it
        kind = f"{out.suffix} files" if out.suffix else "files without a suffix"
        raise ValueError(
            f"Cannot write {out}: PIL cannot write {kind}; give a name ending in .png."
        )
    if out.is_symlink() and not out.exists():
        raise ValueError(f"Cannot write {out}: it is a symlink to nothing.")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists already; pass --force to overwrite it.")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"Cannot write {out}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Cannot write {out}: the folder {folder} is not writable.")
    return out, image_format


def publish(picture, out: Path, image_format: str, force: bool):
    """Write a PIL image to a temporary file beside `out`, then move it into place:
    a reader never sees half a file, and without `force` a file that appeared at
    `out` while generating is kept (os.link refuses to replace it)."""
    import secrets

    temporary = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    handle = os.open(temporary, flags, 0o666)  # the umask applies, as to open()
    try:
        with os.fdopen(handle, "wb") as file:
            picture.save(file, format=image_format)
        if force:
            os.replace(temporary, out)  # replaces a symlink itself, not its target
            return
        try:
            _link(temporary, out)
        except FileExistsError:
            raise ValueError(
                f"{out} appeared while generating; pass --force to overwrite it."
            ) from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _link(temporary: Path, out: Path):
    """Give `temporary`'s content the name `out` unless `out` exists
    (FileExistsError): a hard link, or an exclusive copy where there are none."""
    try:
        os.link(temporary, out)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares)
        with open(out, "xb") as file:
            file.write(temporary.read_bytes())


def open_image(path):
    """An image file, opened but not decoded (PIL reads the header only), or
    None for no file; one clear error if it is not an image."""
    if path is None:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():  # decode_image checks the size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError:
        limit = 2 * Image.MAX_IMAGE_PIXELS  # PIL refuses to open more
        raise ValueError(
            f"Cannot read {path}: it has more than {limit:,} pixels."
        ) from None
    except OSError as error:  # also PIL's "cannot identify image file"
        reason = getattr(error, "strerror", None) or "not an image PIL can read"
        raise ValueError(f"Cannot read {path}: {reason}.") from None


def decode_image(image, path, mode, side):
    """The pixels of an opened image in `mode`, refused before decoding if it is
    larger than side × side (8× the model's image side, so memory stays bounded)."""
    if image is None:
        return None
    width, height = image.size
    if width > side or height > side:
        image.close()
        raise ValueError(
            f"{path} is {width}×{height} pixels; this model takes at most "
            f"{side}×{side} ({IMAGE_SIZE_FACTOR}× its image size): scale it down."
        )
    try:
        with image:
            return image.convert(mode)
    except OSError as error:  # a damaged or truncated file
        raise ValueError(f"Cannot read {path}: {error}.") from None
