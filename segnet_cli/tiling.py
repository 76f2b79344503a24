"""Tile geometry and stitching, in pure numpy: geometry first, pixels later.

Why geometry first: a grid computed before any pixel moves tells the caller how many tiles
there are, which shapes they have (so same-shaped tiles can share a model batch), how many
input rows a band of tiles needs (so ``segnet tile`` can stream a gigapixel TIFF through a
fixed memory budget), and what the run will cost (``segnet tile --plan``). The stitcher is a
separate object that only accumulates what the model returns.

How a tile sees what whole-image inference sees (overlap-tile, as in U-Net, made exact as in
Majurski & Bajcsy 2021):

* Every output pixel belongs to exactly one tile's *core*; the tile's *window* is the core
  plus a *halo* of context on every side, clipped at the image border. Clipping (rather than
  padding) means a tile at the border sees exactly what the whole image has there: the
  model's own "same" zero padding, nothing invented.
* Window origins are multiples of the model's total stride (2 ** pooling stages), so every
  pooling window in a tile is a pooling window of the whole image.
* With a halo of at least half the model's receptive field, a core pixel's logits are
  computed from exactly the pixels whole-image inference uses: the masks are identical.
  Smaller halos trade a few differing pixels for less overlap (README: "Tiling").
* An image that fits in one tile runs whole, at its own size, and pays for no halo.

Windows of one grid row all start on the same input row, so a band of input rows
``[row.window_start, row.window_end)`` is all that a grid row needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segnet_cli.config import Blend, TilingConfig
from segnet_cli.errors import UsageError


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis: its window (what the model sees) and its core."""

    window_start: int
    window_end: int
    core_start: int
    core_end: int

    @property
    def window(self) -> int:
        return self.window_end - self.window_start


def axis_spans(size: int, tile: int, halo: int, stride: int) -> list[Span]:
    """Split one axis of ``size`` pixels into spans.

    Cores partition ``[0, size)``. Interior windows are ``tile`` long and start on a
    multiple of ``stride``; each core has at least ``halo`` pixels of context on both sides
    unless the image ends first. The last window is pulled back to end at the border (its
    start rounded down to the stride), so it is at most ``tile + stride - 1`` long.
    """
    if size <= 0:
        raise ValueError("size must be positive")
    if size < tile + stride:
        # Fits in one window (the last window may be up to stride - 1 longer than a tile).
        return [Span(0, size, 0, size)]
    spans: list[Span] = []
    core_start = 0
    while core_start < size:
        w0 = 0 if core_start == 0 else core_start - halo
        w1 = w0 + tile
        if w1 >= size:
            # Last tile: end at the border, start on the stride grid, keep >= halo context.
            w0 = min(w0, ((size - tile) // stride) * stride)
            w0 = max(0, w0)
            spans.append(Span(w0, size, core_start, size))
            break
        core_end = w1 - halo
        spans.append(Span(w0, w1, core_start, core_end))
        core_start = core_end
    return spans


@dataclass(frozen=True)
class Tile:
    """One tile: its index, grid row and column, and its window/core boxes (y0, x0, y1, x1).

    A ``flipped`` tile belongs to the mirrored view of test-time augmentation
    (``TileGrid.mirrored``): the model sees its window's pixels left-right mirrored, and its
    output is mirrored back before stitching. Its boxes are in the image's own coordinates.
    """

    index: int
    row: int
    col: int
    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    flipped: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.window
        return (y1 - y0, x1 - x0)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of an ``height`` x ``width`` image, computed before any pixel is read.

    Build with ``TileGrid.make``, which aligns the tile and halo to the model's stride.
    """

    height: int
    width: int
    tile: int
    halo: int
    stride: int
    rows: tuple[Span, ...]
    cols: tuple[Span, ...]

    @classmethod
    def make(cls, height: int, width: int, tile: int, halo: int, stride: int) -> TileGrid:
        """Make a grid; ``tile`` is rounded down and ``halo`` up to multiples of ``stride``.

        Raises:
            UsageError: the tile is too small for its halo, or sizes are not positive.
        """
        if height < 1 or width < 1:
            raise UsageError(f"image has no pixels ({width}x{height})")
        if stride < 1 or tile < 1 or halo < 0:
            raise UsageError("tile and stride must be positive, halo not negative")
        asked = (tile, halo)
        tile = (tile // stride) * stride
        halo = math.ceil(halo / stride) * stride
        if tile < 2 * halo + stride:
            rounded = (
                f" (--tile {asked[0]} and --halo {asked[1]} become {tile} and {halo}: multiples "
                f"of the model's stride, {stride})" if (tile, halo) != asked else ""
            )
            raise UsageError(
                f"tile {tile} leaves no core inside a halo of {halo} on both sides{rounded}: "
                f"use a tile of at least {2 * halo + stride} (multiples of {stride})"
            )
        return cls(
            height,
            width,
            tile,
            halo,
            stride,
            tuple(axis_spans(height, tile, halo, stride)),
            tuple(axis_spans(width, tile, halo, stride)),
        )

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tile_at(self, r: int, c: int) -> Tile:
        rs, cs = self.rows[r], self.cols[c]
        return Tile(
            r * len(self.cols) + c,
            r,
            c,
            (rs.window_start, cs.window_start, rs.window_end, cs.window_end),
            (rs.core_start, cs.core_start, rs.core_end, cs.core_end),
        )

    def tiles(self):
        """All tiles, row by row (the order the streaming stitcher needs)."""
        for r in range(len(self.rows)):
            for c in range(len(self.cols)):
                yield self.tile_at(r, c)

    def row_tiles(self, r: int, mirrored: bool = False) -> list[Tile]:
        """The tiles of grid row ``r``; with ``mirrored``, then those of its mirrored view."""
        tiles = [self.tile_at(r, c) for c in range(len(self.cols))]
        return tiles + [self.mirrored(t) for t in tiles] if mirrored else tiles

    def all_tiles(self, mirrored: bool = False) -> list[Tile]:
        """Every tile row by row; with ``mirrored``, each row's mirrored view after it."""
        return [t for r in range(len(self.rows)) for t in self.row_tiles(r, mirrored)]

    def mirrored(self, tile: Tile) -> Tile:
        """The tile at the same place in the left-right mirrored image, in this image's
        coordinates.

        Why this keeps tiling exact: the mirrored image has the same width, so the same
        column spans; a window ``[x0, x1)`` of the mirrored image, stride-aligned there, is
        the columns ``[W - x1, W - x0)`` here. Cores still partition the row, so every pixel
        gets exactly one value from each view, as whole-image inference on the image and on
        its mirror gives it.
        """
        w = self.width
        y0, x0, y1, x1 = tile.window
        cy0, cx0, cy1, cx1 = tile.core
        return Tile(
            tile.index, tile.row, tile.col, (y0, w - x1, y1, w - x0), (cy0, w - cx1, cy1, w - cx0),
            not tile.flipped,
        )

    @property
    def single(self) -> bool:
        """The image fits in one window: it runs whole, at its own size, with no halo."""
        return len(self) == 1

    def computed_pixels(self) -> int:
        """Pixels the model processes in all windows (the cost of the overlap)."""
        return sum(r.window for r in self.rows) * sum(c.window for c in self.cols)

    def overhead(self) -> float:
        """Computed pixels per output pixel (1.0 = no overlap)."""
        return self.computed_pixels() / (self.height * self.width)

    def max_window(self) -> tuple[int, int]:
        return (max(r.window for r in self.rows), max(c.window for c in self.cols))

    def shapes(self) -> dict[tuple[int, int], int]:
        """How many tiles have each window shape (tiles of one shape can share a batch)."""
        out: dict[tuple[int, int], int] = {}
        for t in self.tiles():
            out[t.shape] = out.get(t.shape, 0) + 1
        return out

    def band_rows(self) -> int:
        """Most input rows one grid row of windows needs (what a streaming reader holds)."""
        return max(r.window for r in self.rows)


def gaussian_window(shape: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """A separable Gaussian weight (peak 1) over a window, sigma = size * ``sigma_scale``.

    nnU-Net's choice; the floor keeps border pixels (covered by one tile only) well defined.
    """
    h, w = shape

    def g(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2
        s = max(n * sigma_scale, 1e-3)
        return np.exp(-0.5 * (x / s) ** 2)

    win = np.outer(g(h), g(w))
    win /= win.max()
    return np.maximum(win, 1e-4).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in a new array (``logits`` is left as it is)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Stitcher:
    """Accumulates tile outputs and hands back finished rows of the mask, top to bottom.

    ``"center"`` mode (overlap-tile, the default) takes each pixel from the core of the one
    tile that owns it: no float accumulator, just the class indices of the current band.
    ``"gaussian"`` mode blends the softmax of every window covering a pixel, weighted by a
    Gaussian window and normalised by the summed weights; it keeps float sums for the rows
    that tiles still cover and nothing above them.

    Feed tiles in any order within a grid row; ``pop`` returns ``(y0, mask_rows, conf_rows)``
    blocks once every tile that touches them has been added. ``conf_rows`` (the winning
    class's probability, float32) is ``None`` unless ``confidence=True``.

    ``needs`` says what ``add`` takes per tile: ``"classes"`` (the window's class indices),
    ``"confidence"`` (a ``(classes, winning probability)`` pair) or ``"logits"`` (float
    ``(h, w, K)``). Center mode needs no more than classes unless asked for probabilities,
    so the model can reduce its logits where it runs (in parallel, and on a GPU before they
    cross to the host): K floats per pixel become one byte.

    With ``mirrored=True`` (test-time augmentation) every grid row also takes the tiles of
    its mirrored view (``TileGrid.mirrored``), whose outputs are mirrored back here; a pixel's
    probabilities are the mean of the two views' (center mode: each view's one core; gaussian
    mode: every covering window of both views), and the mask is their argmax.
    """

    def __init__(
        self,
        grid: TileGrid,
        num_classes: int,
        mode: Blend | str = Blend.CENTER,
        confidence: bool = False,
        probabilities: bool = False,
        mirrored: bool = False,
    ) -> None:
        mode = Blend.parse(mode, "blend mode")
        self.grid = grid
        self.k = num_classes
        self.mode = mode
        self.confidence = confidence or probabilities
        self.probabilities = probabilities
        self.views = (False, True) if mirrored else (False,)
        self._pending = {
            r: {(c, f) for c in range(len(grid.cols)) for f in self.views}
            for r in range(len(grid.rows))
        }
        self._done_rows = 0  # grid rows finished and handed to ``pop``
        self._ready: list = []
        # Center mode: one class-index band per grid row in flight (a batch may hold tiles
        # of the next row). Gaussian mode: float sums for the rows that tiles still cover,
        # starting at ``_band_start``; grown on demand, trimmed as rows finish.
        self._bands: dict[int, dict[str, np.ndarray]] = {}
        self._band_start = 0
        self._band = {
            "sum": np.zeros((0, grid.width, num_classes), np.float32),
            "w": np.zeros((0, grid.width), np.float32),
        }
        self._windows: dict[tuple[int, int], np.ndarray] = {}
        if mode is Blend.CENTER and not self.probabilities and not mirrored:
            self.needs = "confidence" if self.confidence else "classes"
        else:
            self.needs = "logits"

    def _center_band(self, r: int) -> dict[str, np.ndarray]:
        """The class-index band of grid row ``r`` (rows of the batch may arrive early)."""
        band = self._bands.get(r)
        if band is None:
            g = self.grid
            n = g.rows[r].core_end - g.rows[r].core_start
            if len(self.views) > 1:  # the views' probabilities are summed, then reduced
                band = {"psum": np.zeros((n, g.width, self.k), np.float32)}
            else:
                band = {"mask": np.zeros((n, g.width), np.uint8)}
                if self.confidence:
                    band["conf"] = np.zeros((n, g.width), np.float32)
                if self.probabilities:
                    band["prob"] = np.zeros((n, g.width, self.k), np.float32)
            self._bands[r] = band
        return band

    def _grow_band(self, y1: int) -> None:
        """Extend the gaussian band with zero rows down to ``y1``."""
        have = self._band_start + self._band["sum"].shape[0]
        if y1 > have:
            extra = y1 - have
            self._band["sum"] = np.concatenate(
                [self._band["sum"], np.zeros((extra, self.grid.width, self.k), np.float32)]
            )
            self._band["w"] = np.concatenate(
                [self._band["w"], np.zeros((extra, self.grid.width), np.float32)]
            )

    def add(self, tile: Tile, output) -> None:
        """Add one tile's model output, in the form ``needs`` names (logits are always taken).

        Args:
            tile: the tile the output belongs to.
            output: ``(window_h, window_w, K)`` logits; or, in center mode, the window's
                ``(window_h, window_w)`` class indices, or a ``(classes, confidence)`` pair.
        """
        classes = conf = None
        if isinstance(output, tuple):
            classes, conf = output
            logits = None
        elif output.ndim == 2:
            classes, logits = output, None
        else:
            logits = output
        got = (logits if logits is not None else classes).shape[:2]
        if got != tile.shape:
            raise ValueError(f"tile {tile.index}: output {got} != window {tile.shape}")
        if logits is None and self.needs == "logits":
            raise ValueError("this stitcher needs logits")
        if logits is None and self.confidence and conf is None:
            raise ValueError("this stitcher needs (classes, confidence)")
        if tile.flipped:
            if tile.flipped not in self.views:
                raise ValueError(f"tile {tile.index} is mirrored but this stitcher has no mirror")
            logits = logits[:, ::-1]  # back to the image's own orientation
        wy0, wx0, wy1, wx1 = tile.window
        cy0, cx0, cy1, cx1 = tile.core
        if self.mode is Blend.CENTER:
            band = self._center_band(tile.row)
            b0 = self.grid.rows[tile.row].core_start
            core = (slice(cy0 - wy0, cy1 - wy0), slice(cx0 - wx0, cx1 - wx0))
            rows = slice(cy0 - b0, cy1 - b0)
            if "psum" in band:
                band["psum"][rows, cx0:cx1] += softmax(logits[core].astype(np.float32, copy=False))
            elif logits is None:
                band["mask"][rows, cx0:cx1] = classes[core]
                if self.confidence:
                    band["conf"][rows, cx0:cx1] = conf[core]
            else:
                band["mask"][rows, cx0:cx1] = np.argmax(logits[core], axis=-1)
                if self.confidence:
                    p = softmax(logits[core].astype(np.float32, copy=False))
                    band["conf"][rows, cx0:cx1] = p.max(axis=-1)
                    if self.probabilities:
                        band["prob"][rows, cx0:cx1] = p
        else:
            b0 = self._band_start
            shape = tile.shape
            win = self._windows.get(shape)
            if win is None:
                win = self._windows[shape] = gaussian_window(shape)
            p = softmax(logits.astype(np.float32, copy=False))
            self._grow_band(wy1)
            self._band["sum"][wy0 - b0 : wy1 - b0, wx0:wx1] += p * win[..., None]
            self._band["w"][wy0 - b0 : wy1 - b0, wx0:wx1] += win
        self._pending[tile.row].discard((tile.col, tile.flipped))
        self._advance()

    def skip(self, tile: Tile) -> None:
        """Count ``tile`` as done without an output: every pixel it would set is nodata.

        The caller overwrites those pixels (mask and probabilities) afterwards. Exact for
        the other pixels only when the tile contributes to nothing else: in center mode its
        core must be all nodata, in gaussian mode its whole window.
        """
        # Its rows still become part of the band (all zeros: overwritten by the caller).
        if self.mode is Blend.CENTER:
            self._center_band(tile.row)
        else:
            self._grow_band(tile.window[2])
        self._pending[tile.row].discard((tile.col, tile.flipped))
        self._advance()

    def _advance(self) -> None:
        g = self.grid
        while True:
            r = self._current_row()
            if r is None or self._pending[r]:
                return
            # Grid row r is complete.
            if self.mode is Blend.CENTER:
                b = self._bands.pop(r)
                if "psum" in b:  # the views' mean probability decides
                    p = b.pop("psum")
                    p /= len(self.views)
                    b["mask"] = np.argmax(p, axis=-1).astype(np.uint8)
                    if self.confidence:
                        b["conf"] = p.max(axis=-1)
                    if self.probabilities:
                        b["prob"] = p
                self._ready.append((g.rows[r].core_start, b["mask"], b.get("conf"), b.get("prob")))
            else:
                # Rows above the next grid row's windows receive no more tiles: final.
                nxt = g.rows[r + 1].window_start if r + 1 < len(g.rows) else g.height
                y0 = self._band_start
                s, w = self._band["sum"], self._band["w"]
                n = nxt - y0
                if n > 0:
                    # A pixel only skipped tiles covered has no weight (and is nodata).
                    avg = s[:n] / np.maximum(w[:n, :, None], np.float32(1e-30))
                    mask = np.argmax(avg, axis=-1).astype(np.uint8)
                    conf = avg.max(axis=-1) if self.confidence else None
                    prob = avg if self.probabilities else None
                    self._ready.append((y0, mask, conf, prob))
                    self._band = {"sum": s[n:].copy(), "w": w[n:].copy()}
                    self._band_start = nxt
            self._done_rows = r + 1

    def _current_row(self) -> int | None:
        r = self._done_rows
        return r if r < len(self.grid.rows) else None

    def pop(self) -> list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Finished ``(y0, mask_rows, confidence_rows, probability_rows)`` blocks, in order."""
        out, self._ready = self._ready, []
        return out

    @property
    def finished(self) -> bool:
        return self._current_row() is None


def check_tiling(tiling: TilingConfig, stride: int) -> None:
    """Reject a tiling no image can use with this model (a usage error, not a per-image one).

    Raises:
        UsageError: the tile leaves no core inside its halo at the model's stride.
    """
    TileGrid.make(1 << 20, 1 << 20, tiling.tile, tiling.halo, stride)


def band_bytes(
    grid: TileGrid,
    k: int,
    mode: Blend | str,
    confidence: bool = False,
    probabilities: bool = False,
    mirrored: bool = False,
) -> int:
    """Peak bytes of a stitcher's band: proportional to width x tile, never to height."""
    if Blend.parse(mode, "blend mode") is Blend.CENTER:
        rows = max(r.core_end - r.core_start for r in grid.rows)
        per = 1 + (4 if confidence or probabilities else 0) + (4 * k if probabilities else 0)
        if mirrored:  # the views' probability sums, then the mask and what is asked for
            per += 4 * k
        return rows * grid.width * per
    rows = max(
        grid.rows[i].window_end - (grid.rows[i].window_start if i else 0)
        for i in range(len(grid.rows))
    )
    return rows * grid.width * (4 * k + 4) * 2  # sums + weights, plus a concat copy


def stitch_all(stitcher: Stitcher, height: int, width: int, confidence: bool = False):
    """Collect every finished block of an in-memory run into one mask (and confidence)."""
    mask = np.zeros((height, width), np.uint8)
    conf = np.zeros((height, width), np.float32) if confidence else None
    for y0, m, c, _ in stitcher.pop():
        mask[y0 : y0 + m.shape[0]] = m
        if conf is not None and c is not None:
            conf[y0 : y0 + c.shape[0]] = c
    return mask, conf
