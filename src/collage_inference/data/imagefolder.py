"""An ImageFolder tree: ``root/<split>/<class>/*.png|jpg``, one folder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from collage_inference.data.base import ImageDataset
from collage_inference.errors import DataFormatError, DataNotFoundError
from collage_inference.grid import fit_image

EXTENSIONS = {".png", ".jpg", ".jpeg"}
LAYOUT = "expected root/<split>/<class>/*.png|jpg, for example root/train/cat/001.png"


def load_imagefolder(root: Path, split: str, image_size: int | None = None) -> ImageDataset:
    """Load every image of ``root/split``; class names are the sorted folder names.

    Images of any size are resized to ``image_size`` (default: the first image's height);
    the set is grayscale when every image is, else RGB.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataNotFoundError(f"{split_dir} does not exist; {LAYOUT}")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataFormatError(f"{split_dir} has no class folders; {LAYOUT}")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataFormatError(
                f"class folder {class_dir} holds no .png/.jpg image; add images or remove the folder"
            )
        files.extend((p, label) for p in found)
    pictures = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                pictures.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataFormatError(f"{path} is not a readable image ({exc}); replace or delete it") from exc
    channels = 1 if all(p.ndim == 2 for p in pictures) else 3
    size = image_size or pictures[0].shape[0]
    images = np.stack([fit_image(p, size, channels) for p in pictures])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageDataset(root.name, split, images, labels, tuple(p.name for p in class_dirs), str(root))
