"""Caption grammar, renderer and exact checker of the embedded shapes model.

Every training image shows one shape of one colour on a background of another
colour, captioned ``a {colour} {shape} on a {colour} background``. The checker
reads an image back into (object colour, shape, background colour), which makes
prompt adherence a measurable number instead of a judgement.

Images are uint8 arrays of shape [height, width, 3].
"""

from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 60, 230),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32

# Half-size of a shape in pixels at IMAGE_SIZE: the shape spans 2 * half_size.
MIN_HALF_SIZE = 6
MAX_HALF_SIZE = 11
# Pixels kept free between the shape and the image edge, so the border shows only background.
MARGIN = 3

# Shapes are distinguished by their mean row width, as a share of the bounding-box width, in a band
# near the top (10-25% of the height) and one near the bottom (75-90%). Ideal values:
#   triangle (apex up)  top 0.175, bottom 0.825
#   circle              top 0.75,  bottom 0.75
#   square              top 1.0,   bottom 1.0
# A shape whose top is under half its bottom is a triangle. Otherwise it is a square when the mean
# of both bands is at least 0.875, halfway between circle and square. Unlike the fill ratio (area over box area), these
# widths barely move when a generated square comes out with rounded corners.
TOP_BAND = (0.10, 0.25)
BOTTOM_BAND = (0.75, 0.90)
TRIANGLE_MAX_TOP_TO_BOTTOM = 0.5
SQUARE_MIN_WIDTH = 0.875
# A detected object smaller than this many pixels counts as no object at all.
MIN_OBJECT_PIXELS = 12


@dataclass(frozen=True)
class Scene:
    """Content of one image: the three attributes a caption names."""

    colour: str
    shape: str
    background: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Return every scene of the grammar (6 colours x 3 shapes x 5 backgrounds = 90)."""
    return [
        Scene(colour, shape, background)
        for colour in COLOURS
        for shape in SHAPES
        for background in COLOURS
        if background != colour
    ]


def parse_caption(caption: str) -> Scene | None:
    """Read a caption of the grammar back into a scene, or None if it does not follow it."""
    words = caption.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if colour not in PALETTE or background not in PALETTE or shape not in SHAPES or colour == background:
        return None
    return Scene(colour, shape, background)


def shape_mask(shape: str, cx: float, cy: float, half_size: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Return the boolean [size, size] mask of a shape centred at (cx, cy) in pixel units."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half_size * half_size
    if shape == "square":
        return (np.abs(dx) <= half_size) & (np.abs(dy) <= half_size)
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the bounding square.
        depth = (dy + half_size) / (2 * half_size)
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half_size)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as a uint8 [size, size, 3] image.

    With ``rng`` the shape's size and position vary; without it the shape is centred at its
    middle size.
    """
    scale = size / IMAGE_SIZE
    if rng is None:
        half_size = (MIN_HALF_SIZE + MAX_HALF_SIZE) / 2
        cx = cy = IMAGE_SIZE / 2
    else:
        half_size = rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE)
        low, high = MARGIN + half_size, IMAGE_SIZE - MARGIN - half_size
        cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    mask = shape_mask(scene.shape, cx * scale, cy * scale, half_size * scale, size)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = PALETTE[scene.background]
    image[mask] = PALETTE[scene.colour]
    return image


def _nearest_palette_labels(image: np.ndarray) -> np.ndarray:
    """Label every pixel with the index of the nearest palette colour in RGB."""
    palette = np.array(list(PALETTE.values()), dtype=np.float32)
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1).reshape(image.shape[:2])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest 4-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_count, next_label = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        next_label += 1
        labels[y0, x0] = next_label
        stack, count = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    stack.append((ny, nx))
        if count > best_count:
            best_label, best_count = next_label, count
    return labels == best_label


def _band_width(mask: np.ndarray, band: tuple[float, float]) -> float:
    """Mean row width of the mask inside a horizontal band of its bounding box, as a share of the box width."""
    rows, cols = np.nonzero(mask)
    top, height = rows.min(), rows.max() - rows.min() + 1
    left, width = cols.min(), cols.max() - cols.min() + 1
    first = top + int(np.floor(band[0] * height))
    last = max(top + int(np.ceil(band[1] * height)), first + 1)
    return float(mask[first:last, left : left + width].sum(axis=1).mean() / width)


def classify_shape(mask: np.ndarray) -> str | None:
    """Name the shape of a boolean object mask by its row-width profile, or None if it is too small."""
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    top, bottom = _band_width(mask, TOP_BAND), _band_width(mask, BOTTOM_BAND)
    if top < TRIANGLE_MAX_TOP_TO_BOTTOM * bottom:
        return "triangle"
    if (top + bottom) / 2 >= SQUARE_MIN_WIDTH:
        return "square"
    return "circle"


def read_scene(image: np.ndarray) -> Scene:
    """Read an image back into the scene it shows.

    The background is the commonest palette colour on the one-pixel border, the object is the
    largest connected region of the commonest other colour, and its shape follows from its
    row-width profile. Attributes that cannot be read are returned as empty strings.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [height, width, 3], got {image.shape}")
    labels = _nearest_palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(PALETTE)).argmax())

    inside = labels[labels != background]
    if inside.size < MIN_OBJECT_PIXELS:
        return Scene("", "", COLOURS[background])
    colour = int(np.bincount(inside, minlength=len(PALETTE)).argmax())
    shape = classify_shape(_largest_component(labels == colour))
    return Scene(COLOURS[colour], shape or "", COLOURS[background])


def adherence_prompts(count: int = 90) -> list[tuple[str, int]]:
    """Return the fixed (prompt, seed) pairs that the adherence score is measured over.

    The first 90 cover every scene once; the seed of each pair is its index.
    """
    scenes = all_scenes()
    return [(scenes[i % len(scenes)].caption(), i) for i in range(count)]


def adherence(images: list[np.ndarray], prompts: list[str]) -> float:
    """Return the share of images whose colour, shape and background all match their prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; expected one image per prompt")
    if not images:
        raise ValueError("adherence needs at least one image")
    hits = 0
    for image, prompt in zip(images, prompts):
        expected = parse_caption(prompt)
        if expected is None:
            raise ValueError(f"prompt {prompt!r} does not follow 'a {{colour}} {{shape}} on a {{colour}} background'")
        hits += read_scene(image) == expected
    return hits / len(images)
