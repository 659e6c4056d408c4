"""
Image splitting, nanoVLM's rule (--image_splitting=true): each image resized to a grid of
tiles of the vision tower's input size, plus a global view; view_tokens writes the token
layout, image_views the views, collate / encode_for_batch the batch (data.py's layout, with
these views and tokens). The tiny world never splits (one view per image: data.collate).

Idefics3 / SmolVLM's rule (Idefics3Splitting, read from a SmolVLM folder's processor settings):
tiles first, the global view last, and its own token layout (idefics3_image_prompt); image_views
returns an Idefics3Grid for it, which tells encode_example to write that layout.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image

import data
from data import image_to_tensor  # noqa: F401  (tiles.image_to_tensor: the same function)

# nanoVLM's image-splitting tokens (models/config.py vlm_extra_tokens): one global-view token and
# an 8x8 table of 1-based grid tokens; load_tokenizer(image_splitting=True) appends them after
# <image> in this order, which is nanoVLM's numbering (<image> 49152, global 49153, <row_1_col_1>
# 49154, ...).
MAX_GRID = 8          # nanoVLM's largest tile grid: <row_1_col_1> .. <row_8_col_8>
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
grid_token = "<row_{}_col_{}>".format          # grid_token(row, col), both 1-based
VIEW_TOKENS = (GLOBAL_IMAGE_TOKEN,
               *(grid_token(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)))


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
    if isinstance(splitting, Idefics3Splitting):
        return splitting.views(image, tile)
    return _nanovlm_views(image, tile, splitting)


def _nanovlm_views(image, tile, splitting=None):
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


# ----------------------------------------------------------------------------------------
# Idefics3 / SmolVLM (transformers' Idefics3ImageProcessor and SmolVLMProcessor, PIL backend)

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"    # Idefics3's tokenizer defaults
IDEFICS3_GLOBAL_TOKEN = "<global-img>"
IDEFICS3_MAX_SIDE = 4096                          # the processor's absolute cap on a side


class Idefics3Grid(NamedTuple):
    """How one image was split by Idefics3Splitting: rows x cols tiles + a global view, or
    (0, 0) for the global view alone (the processor's own convention)."""
    rows: int
    cols: int


@dataclass(frozen=True)
class Idefics3Splitting:
    """The image preparation of an Idefics3 / SmolVLM processor (preprocessor_config.json).

    longest_edge: size.longest_edge, the first resize (SmolVLM-256M: 2048 = 4 tiles).
    tile: max_image_size.longest_edge, the side of every view = the vision tower's image_size.
    split: do_image_splitting; False = one view per image, squeezed to tile x tile.
    resample: the PIL filter (1 = LANCZOS, the processor's default).
    Pixels are (x / 255 - 0.5) / 0.5 (image_mean = image_std = 0.5; weights.py checks)."""
    longest_edge: int = 2048
    tile: int = 512
    split: bool = True
    resample: int = 1

    def check_tile(self, tile):
        if tile != self.tile:
            raise ValueError(f"Idefics3 splitting: views are {self.tile} px "
                             f"(max_image_size.longest_edge) but the vision tower takes {tile} px")

    def views(self, image, tile):
        """PIL image -> (views (k, 3, tile, tile), Idefics3Grid), views in token order: the
        rows x cols tiles row-major, then the global view. Three resizes, as the processor:
        longest side to longest_edge (the other side by the aspect ratio, made even), each side
        up to a multiple of the tile, and the global view squeezed to one tile."""
        self.check_tile(tile)
        image = image.convert("RGB")
        resize = lambda im, hw: im.resize(hw[::-1], self.resample) if im.size != hw[::-1] else im
        image = resize(image, idefics3_first_size(image.height, image.width, self.longest_edge))
        T = self.tile
        if not self.split:
            views, grid = [resize(image, (T, T))], Idefics3Grid(0, 0)
        else:
            image = resize(image, idefics3_tile_size(image.height, image.width, T))
            if image.height > T or image.width > T:
                rows, cols = image.height // T, image.width // T
                views = [image.crop((c * T, r * T, (c + 1) * T, (r + 1) * T))
                         for r in range(rows) for c in range(cols)] + [resize(image, (T, T))]
                grid = Idefics3Grid(rows, cols)
            else:
                views, grid = [image], Idefics3Grid(0, 0)
        return torch.stack([image_to_tensor(v, T) for v in views]), grid


def idefics3_first_size(h, w, longest_edge):
    """(h, w) -> (H, W): the long side becomes longest_edge, the other follows the aspect ratio
    (truncated, then made even), both at least 1, then capped at IDEFICS3_MAX_SIDE."""
    aspect = w / h
    if w >= h:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > IDEFICS3_MAX_SIDE:
        w, h = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif h > w and h > IDEFICS3_MAX_SIDE:
        h, w = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(h, 1), max(w, 1)


def idefics3_tile_size(h, w, tile):
    """(h, w) -> (H, W), both rounded UP to multiples of the tile: the long side first, the
    short one from it by the aspect ratio (truncated), then rounded up (the processor's
    resize_for_vision_encoder)."""
    aspect = w / h
    if w >= h:
        W = math.ceil(w / tile) * tile
        H = math.ceil(int(W / aspect) / tile) * tile
    else:
        H = math.ceil(h / tile) * tile
        W = math.ceil(int(H * aspect) / tile) * tile
    return H, W


def idefics3_image_prompt(grid, n_image_tokens, image_token="<image>"):
    """The text that stands for one image (SmolVLMProcessor / Idefics3Processor): for each tile
    <fake_token_around_image><row_r_col_c> + n image tokens, a newline after each row, then
    "\n" + <fake_token_around_image><global-img> + n image tokens + <fake_token_around_image>.
    A (0, 0) grid is the global part alone (no newlines)."""
    image = image_token * n_image_tokens
    glob = f"{FAKE_IMAGE_TOKEN}{IDEFICS3_GLOBAL_TOKEN}{image}{FAKE_IMAGE_TOKEN}"
    if grid.rows == 0 and grid.cols == 0:
        return glob
    rows = "".join("".join(f"{FAKE_IMAGE_TOKEN}{grid_token(r, c)}{image}"
                           for c in range(1, grid.cols + 1)) + "\n"
                   for r in range(1, grid.rows + 1))
    return rows + "\n" + glob


# ----------------------------------------------------------------------------------------
# Batches of split images: data.py's layout with these views and tokens

def collate(examples, tokenizer, n_image_tokens, image_size, splitting=None, max_len=None):
    """data.collate with each image split by `splitting` (None: one view per image, as there)."""
    items = [encode_for_batch(ex, tokenizer, n_image_tokens, image_size, splitting)
             for ex in examples]
    return data.batch_of(items, data.special_id(tokenizer, data.PAD_TOKEN), max_len)


def encode_for_batch(example, tokenizer, n_image_tokens, image_size, splitting=None):
    """data.encode_for_batch with split images: the views of each image (image_views, in token
    order: global view then tiles) and its grid (n_h, n_w), the ids of encode_example."""
    per_image = [image_views(im, image_size, splitting) for im in data.example_images(example)]
    grids = [g for _, g in per_image]
    return {"pair": encode_example(example, tokenizer, n_image_tokens,
                                   grids if splitting is not None else None),
            "views": [v for v, _ in per_image], "grids": grids, "source": example["source"]}


def encode_example(example, tokenizer, n_image_tokens, grids=None):
    """data.encode_example with grids = [(n_h, n_w) per image] (None: one view per image): each
    image is view_tokens(n_h, n_w, n_image_tokens), and with several images each is preceded by
    the text "<image: i>" as nanoVLM writes it. An Idefics3Grid (Idefics3Splitting, a SmolVLM
    student) is its processor's text for the image (idefics3_image_prompt), tokenized as the
    processor tokenizes it."""
    n_images = len(data.example_images(example))
    if grids is None:
        return data.encode_example(example, tokenizer, n_image_tokens)
    if len(grids) != n_images:
        raise ValueError(f"{len(grids)} image grids for {n_images} image(s)")

    def image_part(i):
        if isinstance(grids[i], Idefics3Grid):
            return "", tokenizer.encode(idefics3_image_prompt(grids[i], n_image_tokens)).ids
        names = view_tokens(*grids[i], n_image_tokens)
        ids = {t: data.special_id(tokenizer, t) for t in set(names)}
        return f"<image: {i}>" if n_images > 1 else "", [ids[t] for t in names]
    return data.encode_example(example, tokenizer, n_image_tokens, image_part)


def view_tokens(n_h, n_w, n_image_tokens):
    """The token sequence of one image split into n_h x n_w tiles (nanoVLM get_image_string):
    GLOBAL_IMAGE_TOKEN + n <image> (the global view), then for each tile in row-major order
    grid_token(r, c) (1-based) + n <image>. A 1x1 split is the global view alone."""
    if not (1 <= n_h <= MAX_GRID and 1 <= n_w <= MAX_GRID):
        raise ValueError(f"a {n_h}x{n_w} split has no grid tokens; at most {MAX_GRID}x{MAX_GRID}")
    out = [GLOBAL_IMAGE_TOKEN] + [data.IMAGE_TOKEN] * n_image_tokens
    if (n_h, n_w) != (1, 1):
        for r in range(1, n_h + 1):
            for c in range(1, n_w + 1):
                out += [grid_token(r, c)] + [data.IMAGE_TOKEN] * n_image_tokens
    return out
