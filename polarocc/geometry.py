"""How an image becomes the model input: resize, optional center crop, optional tiles.

``backbone.resize`` is a square side (the paper's 256), ``[height, width]``, or an aspect-preserving
``{shorter_side: N}`` / ``{longer_side: N}``; ``backbone.crop`` is a square side, ``[height, width]`` or null (the
whole resized frame); ``backbone.tiles`` covers the model input with overlapping square tiles that the backbone
sees one at a time (:mod:`polarocc.models.tiling` stitches their features).

A :class:`GeometrySpec` is what the params say; a :class:`Geometry` is a concrete input size. An aspect-preserving
spec becomes concrete from a reference image (a category's first training image): every image of that category
is then resized to the same size, as the square resize already does, so their features share one shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from polarocc.errors import ConfigError

SIDES = ("shorter_side", "longer_side")
Size = tuple[int, int]  # (height, width)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(value: Any, key: str, label: str = "params key") -> Size:
    """``value`` (a positive int or a [height, width] pair) as (height, width); ConfigError naming ``key``."""
    if _is_int(value) and value > 0:
        return int(value), int(value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{label} '{key}' must be a positive integer (square) or [height, width], got {value!r}")


@dataclass(frozen=True)
class Tiles:
    """Square tiles of ``size`` px overlapping by the fraction ``overlap`` of a tile."""

    size: int
    overlap: float = 0.25

    def offsets(self, length: int, stride: int) -> list[int]:
        """Tile starts along an axis of ``length`` px: multiples of the feature ``stride`` (so tile features land on
        whole positions of the stitched map), neighbours at most ``size * (1 - overlap)`` apart, the last one
        reaching the end (up to ``stride - 1`` px past it, which the extractor pads)."""
        if length <= self.size:
            return [0]
        last = math.ceil((length - self.size) / stride) * stride
        count = math.ceil(last / (self.size * (1 - self.overlap))) + 1
        starts = [round(last * i / (count - 1) / stride) * stride for i in range(count)]
        return sorted(set(starts))

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "overlap": self.overlap}


def parse_tiles(value: Any, key: str = "backbone.tiles", label: str = "params key") -> Tiles | None:
    """``backbone.tiles`` (null or ``{size: int, overlap: float}``) as :class:`Tiles`; ConfigError naming the key."""
    if value is None:
        return None
    if isinstance(value, Tiles):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label} '{key}' must be null or a mapping {{size: 224, overlap: 0.25}}, got {value!r}")
    unknown = sorted(set(value) - {"size", "overlap"})
    if unknown:
        raise ConfigError(f"unknown {label}(s) {', '.join(f'{key}.{k}' for k in unknown)}; valid keys are overlap, "
                          "size")
    size, overlap = value.get("size"), value.get("overlap", 0.25)
    if not (_is_int(size) and size >= 32):
        raise ConfigError(f"{label} '{key}.size' must be an integer >= 32 (tile side in px), got {size!r}")
    if not (isinstance(overlap, int | float) and not isinstance(overlap, bool) and 0 <= overlap < 1):
        raise ConfigError(f"{label} '{key}.overlap' must be a fraction of a tile in [0, 1), got {overlap!r}")
    return Tiles(int(size), float(overlap))


@dataclass(frozen=True)
class Geometry:
    """A concrete model input: resize to ``resize`` (height, width), then center-crop to ``crop`` (None: no crop),
    then, with ``tiles``, features from tiles of that input. Ints are squares."""

    resize: Size | int = 256
    crop: Size | int | None = 224
    tiles: Tiles | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _size(self.resize, "backbone.resize"))
        if self.crop is not None:
            crop = _size(self.crop, "backbone.crop")
            object.__setattr__(self, "crop", crop)
            if crop[0] > self.resize[0] or crop[1] > self.resize[1]:
                raise ConfigError(f"params key 'backbone.crop': {_text(crop)} must fit inside the resized image "
                                  f"{_text(self.resize)}; lower the crop or raise backbone.resize")
        object.__setattr__(self, "tiles", parse_tiles(self.tiles))

    @property
    def size(self) -> Size:
        """The model input's (height, width): the crop, or the resized image without one."""
        return self.crop if self.crop is not None else self.resize  # type: ignore[return-value]

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]

    def box(self) -> tuple[int, int, int, int]:
        """The crop box (left, top, right, bottom) in the resized image (the whole image without a crop)."""
        (rh, rw), (h, w) = self.resize, self.size
        top, left = (rh - h) // 2, (rw - w) // 2
        return left, top, left + w, top + h

    def record(self) -> dict[str, Any]:
        """JSON form kept with stores and models; the paper's square geometry keeps its old form
        ``{"resize": 256, "crop": 224}`` (so existing stores keep their fingerprints)."""
        out: dict[str, Any] = {"resize": size_record(self.resize), "crop": None if self.crop is None
                               else size_record(self.crop)}
        if self.tiles is not None:
            out["tiles"] = self.tiles.record()
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], label: str = "geometry") -> Geometry:
        """The geometry a store or model recorded (:meth:`record`); ConfigError naming the bad entry."""
        unknown = sorted(set(record) - {"resize", "crop", "tiles"})
        if unknown or "resize" not in record or "crop" not in record:
            raise ConfigError(f"{label} must hold resize and crop (and optionally tiles), got {dict(record)!r}")
        crop = record["crop"]
        return cls(_size(record["resize"], f"{label}.resize", "entry"),
                   None if crop is None else _size(crop, f"{label}.crop", "entry"),
                   parse_tiles(record.get("tiles"), f"{label}.tiles", "entry"))


def size_record(size: Size) -> int | list[int]:
    """A (height, width) as JSON: one int for a square (the paper's form), else [height, width]."""
    return size[0] if size[0] == size[1] else [size[0], size[1]]


def _text(size: Size) -> str:
    return f"{size[0]}x{size[1]} (height x width)"


def parse_option(text: str | None, option: str) -> Any:
    """A command-line geometry value as its params form: ``256`` (square), ``307x768`` (height x width),
    ``longer:768`` / ``shorter:512`` (aspect kept), ``none`` (no crop, no tiles), ``224:0.25`` (tiles: size and
    overlap, for ``--tiles``); ConfigError naming ``option``."""
    if text is None or text.strip().lower() in ("none", "null", ""):
        return None
    value = text.strip().lower()
    try:
        if option == "--tiles":
            size, _, overlap = value.partition(":")
            return {"size": int(size), "overlap": float(overlap) if overlap else 0.25}
        if ":" in value:
            side, _, n = value.partition(":")
            if side not in ("longer", "shorter"):
                raise ValueError(side)
            return {f"{side}_side": int(n)}
        if "x" in value:
            height, _, width = value.partition("x")
            return [int(height), int(width)]
        return int(value)
    except ValueError:
        forms = ("SIZE or SIZE:OVERLAP (e.g. 224:0.25), or none" if option == "--tiles" else
                 "N (square), HxW (e.g. 307x768)" + (", longer:N or shorter:N" if option == "--resize" else "")
                 + (", or none" if option == "--crop" else ""))
        raise ConfigError(f"option {option}: cannot read {text!r}; give {forms}") from None


@dataclass(frozen=True)
class GeometrySpec:
    """What ``backbone.resize``/``crop``/``tiles`` say; :meth:`resolve` makes it concrete for an image size."""

    resize: Size | dict[str, int]
    crop: Size | None
    tiles: Tiles | None = None
    prefix: str = field(default="backbone.", compare=False)  # how errors name the keys
    label: str = field(default="params key", compare=False)

    @classmethod
    def parse(cls, resize: Any, crop: Any, tiles: Any = None, prefix: str = "backbone.",
              label: str = "params key") -> GeometrySpec:
        """Validate the three params values; ConfigError naming the key (``prefix`` + name)."""
        if isinstance(resize, Mapping):
            entries = dict(resize)
            if len(entries) != 1 or next(iter(entries)) not in SIDES:
                raise ConfigError(f"{label} '{prefix}resize' as a mapping must be {{shorter_side: N}} or "
                                  f"{{longer_side: N}}, got {entries!r}")
            side, n = next(iter(entries.items()))
            if not (_is_int(n) and n > 0):
                raise ConfigError(f"{label} '{prefix}resize.{side}' must be a positive integer, got {n!r}")
            parsed_resize: Size | dict[str, int] = {side: int(n)}
        else:
            try:
                parsed_resize = _size(resize, f"{prefix}resize", label)
            except ConfigError:
                raise ConfigError(f"{label} '{prefix}resize' must be a positive integer (square), [height, width], "
                                  f"{{shorter_side: N}} or {{longer_side: N}}, got {resize!r}") from None
        parsed_crop = None if crop is None else _size(crop, f"{prefix}crop", label)
        spec = cls(parsed_resize, parsed_crop, parse_tiles(tiles, f"{prefix}tiles", label), prefix, label)
        if spec.fixed:
            spec.resolve()  # a crop larger than the resize, or tiles larger than the input, fail here
        return spec

    @property
    def fixed(self) -> bool:
        """Whether the input size is known without an image (no aspect-preserving resize)."""
        return not isinstance(self.resize, dict)

    def resolve(self, image_size: Size | None = None, source: str = "") -> Geometry:
        """The concrete geometry for images of ``image_size`` (height, width), needed only when aspect-preserving;
        ConfigError (naming ``source``, e.g. the reference image) when the crop or the tiles do not fit."""
        where = f" for {source}" if source else ""
        if isinstance(self.resize, dict):
            if image_size is None:
                raise ValueError("an aspect-preserving resize needs the reference image's size")
            side, n = next(iter(self.resize.items()))
            height, width = image_size
            scale = n / (min(height, width) if side == "shorter_side" else max(height, width))
            resize = (max(1, round(height * scale)), max(1, round(width * scale)))
        else:
            resize = self.resize
        if self.crop is not None and (self.crop[0] > resize[0] or self.crop[1] > resize[1]):
            raise ConfigError(f"{self.label} '{self.prefix}crop': {_text(self.crop)} must fit inside the resized "
                              f"image {_text(resize)}{where}; lower the crop, set it to null, or raise "
                              f"{self.prefix}resize")
        geometry = Geometry(resize, self.crop, self.tiles)  # a valid crop: checked above
        if self.tiles is not None and self.tiles.size > min(geometry.size):
            raise ConfigError(f"{self.label} '{self.prefix}tiles.size': {self.tiles.size} px tiles do not fit the "
                              f"model input {_text(geometry.size)}{where}; use tiles of at most "
                              f"{min(geometry.size)} px, or null")
        return geometry

    def record(self) -> dict[str, Any]:
        """The params form (for messages and model provenance)."""
        resize: Any = dict(self.resize) if isinstance(self.resize, dict) else size_record(self.resize)
        return {"resize": resize, "crop": None if self.crop is None else size_record(self.crop),
                "tiles": None if self.tiles is None else self.tiles.record()}
