"""Pixels, shares and areas per class, counted as mask rows stream past; and the class table
GDAL and QGIS read beside the mask.

Areas are in square metres when the input is georeferenced: a projected CRS gives every
pixel the same area (the transform's determinant in the CRS's unit, converted to metres); a
geographic CRS (degrees) gives each row its own area on the authalic sphere
(``io.gdal.Georef.row_areas_m2``). Without a CRS areas are left out and pixels remain.

Pure NumPy and XML: no GDAL needed, so every ``segnet tile`` run reports its class areas.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

import numpy as np

from segnet_cli.io.gdal import Georef

#: Pixels counted per ``np.bincount`` call: it converts uint8 to a platform integer first, so
#: one call over a 768-row band of a 20000-px-wide mask would briefly hold 123 MB of int64.
COUNT_CHUNK = 1 << 20


def count_values(mask: np.ndarray) -> np.ndarray:
    """How often each value 0-255 occurs in the uint8 ``mask``, counted a chunk at a time."""
    flat = mask.reshape(-1)
    counts = np.zeros(256, np.int64)
    for i in range(0, flat.size, COUNT_CHUNK):
        counts += np.bincount(flat[i : i + COUNT_CHUNK], minlength=256)[:256]
    return counts


class ClassAreas:
    """Per-class pixel counts (and areas in m²) of mask rows added top to bottom."""

    def __init__(self, num_classes: int, georef: Georef, nodata_class: int | None) -> None:
        self.k = num_classes
        self.georef = georef
        self.nodata_class = nodata_class
        self.pixels = np.zeros(256, np.int64)
        self._row_m2 = np.zeros(256, np.float64)
        self._y = 0

    def add(self, mask: np.ndarray) -> None:
        """The next rows of the mask (uint8 class indices)."""
        y0, y1 = self._y, self._y + mask.shape[0]
        self._y = y1
        self.pixels += count_values(mask)
        rows = self.georef.row_areas_m2(y0, y1)
        if rows is not None:  # degrees: a pixel's area depends on its row's latitude
            for r, area in zip(mask, rows):
                self._row_m2 += count_values(r) * area

    @property
    def unit_m2(self) -> float | None:
        return self.georef.pixel_area_m2()

    def area_m2(self) -> np.ndarray | None:
        """Area per mask value in m², or ``None`` when the input has no usable CRS."""
        if self.unit_m2 is not None:
            return self.pixels * self.unit_m2
        if self.georef.row_areas_m2(0, 0) is not None:
            return self._row_m2
        return None

    def as_dict(self, class_names) -> dict:
        """The report: per class pixels, share of the classified pixels, area in m² and ha."""
        nodata = int(self.pixels[self.nodata_class]) if self.nodata_class is not None else 0
        classified = int(self.pixels[: self.k].sum())
        areas = self.area_m2()
        rows = []
        for i, name in enumerate(list(class_names)[: self.k]):
            row = {
                "class": i,
                "name": name,
                "pixels": int(self.pixels[i]),
                "share": round(float(self.pixels[i]) / classified, 6) if classified else 0.0,
            }
            if areas is not None:
                row["area_m2"] = round(float(areas[i]), 3)
                row["area_ha"] = round(float(areas[i]) / 1e4, 6)
            rows.append(row)
        out = {
            "pixels": int(self.pixels.sum()),
            "classified_pixels": classified,
            "nodata_pixels": nodata,
            "crs": _crs_name(self.georef.crs_wkt),
            "pixel_area_m2": None if self.unit_m2 is None else round(self.unit_m2, 9),
            "area_basis": (
                "projected CRS" if self.unit_m2 is not None
                else "geographic CRS, per-row areas on the authalic sphere" if areas is not None
                else "no CRS: pixels only"
            ),
            "classes": rows,
        }
        if areas is not None:
            out["classified_area_m2"] = round(float(areas[: self.k].sum()), 3)
        return out


def _crs_name(wkt: str | None) -> str | None:
    if wkt is None:
        return None
    import re

    m = re.match(r'\s*\w+\[\s*"([^"]*)"', wkt)
    return m.group(1) if m else "custom"


def pam_xml(class_names, palette, pixels: np.ndarray | None, description: str = "class") -> str:
    """A GDAL PAM sidecar (``<mask>.aux.xml``) naming the classes of band 1.

    GDAL stores a GeoTIFF band's category names and raster attribute table in this sidecar
    (the TIFF has no tag for them); ``gdalinfo`` lists the categories and QGIS reads the
    table (value, class name, colour, pixel count).
    """
    names = list(class_names)
    lines = [
        "<PAMDataset>",
        '  <PAMRasterBand band="1">',
        f"    <Description>{escape(description)}</Description>",
        "    <CategoryNames>",
        *[f"      <Category>{escape(str(n))}</Category>" for n in names],
        "    </CategoryNames>",
        '    <GDALRasterAttributeTable tableType="thematic">',
    ]
    # GDAL's field types (0 integer, 2 string) and usages (5 min-max, 2 name, 6-8 RGB,
    # 1 pixel count), as GDALRasterAttributeTable's XML spells them.
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]
    if pixels is not None:
        fields.append(("Pixels", 0, 1))
    for i, (name, ftype, usage) in enumerate(fields):
        lines.append(
            f'      <FieldDefn index="{i}"><Name>{name}</Name><Type>{ftype}</Type>'
            f"<Usage>{usage}</Usage></FieldDefn>"
        )
    colours = list(palette)
    for i, name in enumerate(names):
        r, g, b = (list(colours[i]) + [0, 0, 0])[:3] if i < len(colours) else (0, 0, 0)
        cells = [str(i), escape(str(name)), str(int(r)), str(int(g)), str(int(b))]
        if pixels is not None:
            cells.append(str(int(pixels[i])))
        lines.append(f'      <Row index="{i}">' + "".join(f"<F>{c}</F>" for c in cells) + "</Row>")
    lines += ["    </GDALRasterAttributeTable>", "  </PAMRasterBand>", "</PAMDataset>", ""]
    return "\n".join(lines)


__all__ = ["ClassAreas", "count_values", "pam_xml"]
