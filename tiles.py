"""
Image splitting, nanoVLM's rule (--image_splitting=true): each image resized to a grid of
tiles of the vision tower's input size, plus a global view; data.view_tokens writes the token
layout, data.collate calls image_views. The tiny world never splits (one view per image).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# nanoVLM's image-splitting tokens (models/config.py vlm_extra_tokens): one global-view token and
# an 8x8 table of 1-based grid tokens; load_tokenizer(image_splitting=True) appends them after
# <image> in this order, which is nanoVLM's numbering (<image> 49152, global 49153, <row_1_col_1>
# 49154, ...).
MAX_GRID = 8          # nanoVLM's largest tile grid: <row_1_col_1> .. <row_8_col_8>
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
grid_token = "<row_{}_col_{}>".format          # grid_token(row, col), both 1-based
VIEW_TOKENS = (GLOBAL_IMAGE_TOKEN,
               *(grid_token(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)))


def image_to_tensor(image, image_size, pixels="[-1,1]"):
    """PIL image -> (3, image_size, image_size) float in [-1, 1] (or [0, 1]); resized if needed."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return x if pixels == "[0,1]" else (x - 0.5) / 0.5


@dataclass(frozen=True)
class ImageSplitting:
    """nanoVLM's image splitting (data/custom_transforms.py DynamicResize, GlobalAndSplitImages;
    data/processors.py get_image_string). The tile is the vision tower's image_size (512 for the
    paper's student). None instead of an ImageSplitting = one view per image, resized to the tile
    (the tiny world).

    max_side: nanoVLM's max_img_size (2048): the longest side after resizing, a multiple of the
        tile, at most MAX_GRID tiles (there are grid tokens up to <row_8_col_8>).
    resize_to_max_side: nanoVLM's resize_to_max_side_len (True in its VLMConfig): the long side
        becomes exactly max_side (small images are upscaled); False: the long side rounds UP to a
        multiple of the tile, capped at max_side.
    pixels: "[-1,1]" ((x - 0.5) / 0.5, SigLIP's processor; our towers) or "[0,1]" (nanoVLM feeds
        torchvision's ToTensor output unnormalised, so its checkpoints expect [0, 1])."""
    max_side: int = 2048
    resize_to_max_side: bool = True
    pixels: str = "[-1,1]"

    def __post_init__(self):
        if self.pixels not in ("[-1,1]", "[0,1]"):
            raise ValueError(f"ImageSplitting.pixels {self.pixels!r}; expected '[-1,1]' or '[0,1]'")

    def check_tile(self, tile):
        if self.max_side % tile or not 1 <= self.max_side // tile <= MAX_GRID:
            raise ValueError(f"image splitting: max_side {self.max_side} must be 1..{MAX_GRID} "
                             f"tiles of {tile} px")


def split_size(h, w, tile, max_side, resize_to_max_side):
    """nanoVLM's resize rule (DynamicResize._get_new_hw): (h, w) -> (H, W), both multiples of tile.
    The long side becomes max_side (resize_to_max_side) or min(max_side, ceil(long / tile) * tile);
    the short side is scaled by the same factor and rounded UP to a multiple of tile (at least one
    tile), so the aspect ratio is kept up to that rounding. Same float operations as nanoVLM."""
    long, short = max(h, w), min(h, w)
    target_long = max_side if resize_to_max_side else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if w >= h else (target_long, target_short)


def tile_grid(h, w, tile):
    """(n_h, n_w) tiles of an image already resized to multiples of tile (nanoVLM SplitImage)."""
    if h % tile or w % tile:
        raise ValueError(f"image size {(h, w)} is not a multiple of the tile {tile}")
    return h // tile, w // tile


def image_views(image, tile, splitting=None):
    """PIL image -> (views (k, 3, tile, tile), (n_h, n_w)), views in the order of view_tokens.

    splitting None: one view, the image resized to the tile (grid (1, 1)). Else nanoVLM's rule:
    resize (bicubic) to split_size, cut row-major tiles; when there is more than one tile the
    first view is the global view (the resized image squeezed to one tile; nanoVLM resizes the
    tensor bilinearly, we use PIL's bilinear); a 1x1 split is just its one tile."""
    image = image.convert("RGB")
    if splitting is None:
        return image_to_tensor(image, tile)[None], (1, 1)
    splitting.check_tile(tile)
    w, h = image.size
    H, W = split_size(h, w, tile, splitting.max_side, splitting.resize_to_max_side)
    resized = image.resize((W, H), Image.BICUBIC) if (W, H) != (w, h) else image
    n_h, n_w = tile_grid(H, W, tile)
    views = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(n_h)
             for c in range(n_w)]
    if len(views) > 1:
        views.insert(0, resized.resize((tile, tile), Image.BILINEAR))
    return torch.stack([image_to_tensor(v, tile, splitting.pixels) for v in views]), (n_h, n_w)
