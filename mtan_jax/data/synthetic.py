"""Procedurally generated street scenes: a no-download stand-in for Cityscapes.

Each scene is rendered with a level pinhole camera (x right, y down, z forward)
standing `h` metres above a flat ground plane and looking along a street. The
street has a road with lane markings, sidewalks, optional grass verges,
building walls on the planes x = -X_left and x = +X_right, an optional facade
closing the street, and fronto-parallel vehicles, people, poles/signs and trees
standing on the ground. Every surface is drawn through one z-buffer, so the
label, inverse depth and normal maps are geometrically consistent by
construction: ground pixels carry exactly 1 / Z of the ground-plane ray, wall
pixels the depth of the wall plane, and each fronto-parallel object one depth.

Labels follow the 7 Cityscapes categories used by MTAN (ids 0..6, -1 = void)
and inverse depth follows MTAN's Cityscapes files (1 / Z in 1/m, 0 = invalid).
The layout is drawn from its own random stream in metric units with a focal
length proportional to the image width, so one index gives the same scene at
every resolution; only the per-pixel grain differs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mtan_jax.errors import ConfigError

CLASS_NAMES = ('flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
NUM_CLASSES = 7

_VOID = -1
_FLAT, _CONSTRUCTION, _OBJECT, _NATURE, _SKY, _HUMAN, _VEHICLE = range(NUM_CLASSES)

# Normal ids stored per pixel; looked up in `_NORMALS` at the end so that the
# drawing code moves one byte per pixel instead of three floats.
_N_NONE, _N_GROUND, _N_LEFT_WALL, _N_RIGHT_WALL, _N_FRONT = range(5)
_NORMALS = np.array(
    [[0, 0, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1]], dtype=np.float32)

_FOCAL_PER_WIDTH = 0.8
# Objects are placed so that |X| / Z stays inside the horizontal half field of
# view (0.5 / 0.8 = 0.625) with a margin, so every placed object is on screen.
_VISIBLE_TAN = 0.55
_MAX_INV_DEPTH = 0.5

# Base albedos (RGB in [0, 1]). Each class owns a distinct family of colours so
# that a small network can learn the mapping quickly; per-scene jitter and
# shading keep it from being a lookup table.
_ROAD = (0.31, 0.29, 0.31)
_SIDEWALK = ((0.58, 0.57, 0.60), (0.52, 0.53, 0.58), (0.62, 0.60, 0.63))
_MARKING = (0.92, 0.92, 0.88)
_GRASS = (0.32, 0.50, 0.18)
_BUILDING = ((0.78, 0.62, 0.42), (0.70, 0.50, 0.34), (0.84, 0.72, 0.52),
             (0.60, 0.44, 0.32), (0.80, 0.66, 0.36))
_WINDOW = (0.16, 0.20, 0.27)
_FOLIAGE = ((0.20, 0.42, 0.12), (0.28, 0.48, 0.16), (0.16, 0.34, 0.14))
_TRUNK = (0.34, 0.24, 0.15)
_POLE = (0.66, 0.62, 0.30)
_SIGN = ((0.95, 0.78, 0.08), (0.85, 0.14, 0.10), (0.15, 0.32, 0.78), (0.95, 0.95, 0.95))
_SHIRT = ((0.82, 0.14, 0.16), (0.90, 0.45, 0.10), (0.68, 0.18, 0.52),
          (0.85, 0.20, 0.45), (0.52, 0.20, 0.62))
_PANTS = ((0.14, 0.16, 0.26), (0.22, 0.20, 0.18), (0.30, 0.28, 0.40))
_SKIN = (0.86, 0.66, 0.52)
_CAR = ((0.10, 0.22, 0.60), (0.08, 0.38, 0.55), (0.16, 0.16, 0.42), (0.22, 0.46, 0.72),
        (0.05, 0.12, 0.32))
_CAR_GLASS = (0.08, 0.10, 0.14)
_TYRE = (0.06, 0.06, 0.07)
_TAIL_LIGHT = (0.95, 0.12, 0.10)
_BONNET = (0.12, 0.12, 0.14)


def _jitter(rng: np.random.Generator, base, amount: float) -> np.ndarray:
  """Returns `base` with independent uniform noise of +-amount per channel."""
  colour = np.asarray(base, dtype=np.float64) + rng.uniform(-amount, amount, 3)
  return np.clip(colour, 0.0, 1.0)


def _pick(rng: np.random.Generator, palette, amount: float) -> np.ndarray:
  """Returns a jittered colour drawn uniformly from `palette`."""
  return _jitter(rng, palette[rng.integers(len(palette))], amount)


def _box_coverage(t, period, duty, width):
  """Box-filtered periodic square wave, used to antialias world-space stripes.

  Args:
    t: coordinate of the pixel centre along the pattern (metres).
    period: pattern period (metres).
    duty: fraction of each period that is "on", starting at multiples of period.
    width: pixel footprint along the pattern (metres).

  Returns:
    The fraction of [t - width/2, t + width/2] that is "on", in [0, 1].
  """
  width = np.maximum(width, 1e-6)

  def integral(s):
    q = s / period
    k = np.floor(q)
    return period * (k * duty + np.minimum(q - k, duty))

  return (integral(t + width / 2) - integral(t - width / 2)) / width


def _interval_coverage(t, lo, hi, width):
  """Fraction of the pixel footprint [t - width/2, t + width/2] inside [lo, hi]."""
  width = np.maximum(width, 1e-6)
  overlap = np.minimum(t + width / 2, hi) - np.maximum(t - width / 2, lo)
  return np.clip(overlap / width, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, grid: tuple[int, int], height: int,
                  width: int) -> np.ndarray:
  """Bilinearly upsampled random grid in [-1, 1].

  The grid is drawn from the layout stream with a fixed size, so the pattern is
  the same at every resolution.
  """
  values = rng.uniform(-1.0, 1.0, grid)

  def axis(n, cells):
    pos = (np.arange(n) + 0.5) / n * (cells - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), cells - 2)
    return lo, pos - lo

  r0, a = axis(height, grid[0])
  c0, b = axis(width, grid[1])
  a = a[:, None]
  top = values[r0][:, c0] * (1 - b) + values[r0][:, c0 + 1] * b
  bottom = values[r0 + 1][:, c0] * (1 - b) + values[r0 + 1][:, c0 + 1] * b
  return (top * (1 - a) + bottom * a).astype(np.float32)


class _Canvas:
  """Z-buffered label / depth / normal / albedo buffers for one camera."""

  def __init__(self, height: int, width: int, cam_height: float, horizon: float,
               grain: np.ndarray, blotch: np.ndarray):
    self.height, self.width = height, width
    self.f = _FOCAL_PER_WIDTH * width
    self.cx = width / 2
    self.vh = horizon
    self.h = cam_height
    self.u = np.arange(width) + 0.5
    self.v = np.arange(height) + 0.5
    self.zbuf = np.full((height, width), np.inf)
    self.label = np.full((height, width), _SKY, dtype=np.int32)
    self.nid = np.zeros((height, width), dtype=np.int8)
    self.albedo = np.zeros((height, width, 3), dtype=np.float32)
    self.grain = grain
    self.blotch = blotch

  def _span(self, lo: float, hi: float, n: int) -> tuple[int, int]:
    """Indices of the pixels whose centres lie in [lo, hi), clipped to [0, n]."""
    return (int(np.clip(np.ceil(lo - 0.5), 0, n)), int(np.clip(np.ceil(hi - 0.5), 0, n)))

  def fronto(self, z: float, x0: float, x1: float, y0: float, y1: float, label: int,
             colour, *, grain: float = 0.05, ellipse: bool = False,
             windows: dict | None = None) -> None:
    """Draws a fronto-parallel rectangle or ellipse at depth `z`.

    Args:
      z: depth of the plane (metres).
      x0: left edge (metres, camera x).
      x1: right edge.
      y0: top edge (metres, camera y points down; the ground is at y = h).
      y1: bottom edge.
      label: class id written where the shape is visible.
      colour: RGB albedo.
      grain: relative amplitude of the per-pixel texture noise.
      ellipse: draw the ellipse inscribed in the rectangle instead.
      windows: optional facade window pattern, see `_windows`.
    """
    s = self.f / z
    u0, u1 = self.cx + x0 * s, self.cx + x1 * s
    v0, v1 = self.vh + y0 * s, self.vh + y1 * s
    j0, j1 = self._span(u0, u1, self.width)
    i0, i1 = self._span(v0, v1, self.height)
    if j0 >= j1 or i0 >= i1:
      return
    rows, cols = slice(i0, i1), slice(j0, j1)
    # Passing the test at equal depth lets later parts of one object (the
    # windows on a car body) overwrite earlier ones.
    win = self.zbuf[rows, cols] >= z
    if ellipse:
      du = (self.u[cols] - (u0 + u1) / 2) / ((u1 - u0) / 2)
      dv = (self.v[rows] - (v0 + v1) / 2) / ((v1 - v0) / 2)
      win &= du[None, :] ** 2 + dv[:, None] ** 2 < 1
    colour = np.asarray(colour, dtype=np.float32)
    albedo = colour * (1 + grain * self.grain[rows, cols, None])
    if windows is not None:
      x = (self.u[cols] - self.cx) / s
      height_above = self.h - (self.v[rows] - self.vh) / s
      albedo = _windows(albedo, x[None, :], 1 / s, height_above[:, None], 1 / s, windows)
    np.copyto(self.zbuf[rows, cols], z, where=win)
    np.copyto(self.label[rows, cols], label, where=win)
    np.copyto(self.nid[rows, cols], _N_FRONT, where=win)
    np.copyto(self.albedo[rows, cols], albedo, where=win[..., None])


def _windows(albedo, along, fp_along, height_above, fp_height, spec: dict):
  """Blends a grid of antialiased windows into a wall albedo.

  Args:
    albedo: (..., 3) wall albedo.
    along: horizontal wall coordinate (metres), broadcastable to albedo[..., 0].
    fp_along: pixel footprint along `along` (metres).
    height_above: height above the ground (metres).
    fp_height: pixel footprint in height (metres).
    spec: dict with 'period', 'duty', 'phase', 'top', 'colour'.

  Returns:
    The albedo with windows blended in.
  """
  cov = _box_coverage(along - spec['phase'], spec['period'], spec['duty'], fp_along)
  # Windows start above a 3.5 m ground floor, one per 3 m storey, and stop
  # short of the roof line.
  storeys = _box_coverage(height_above - 4.0, 3.0, 0.5, fp_height)
  band = _interval_coverage(height_above, 3.5, spec['top'] - 1.0, fp_height)
  alpha = (cov * storeys * band)[..., None].astype(np.float32)
  return albedo * (1 - alpha) + spec['colour'] * alpha


def _building(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
  """Draws a building colour and window pattern."""
  colour = _pick(rng, _BUILDING, 0.06)
  period = rng.uniform(2.2, 4.0)
  spec = {
      'period': period,
      'duty': rng.uniform(0.3, 0.55),
      'phase': rng.uniform(0, period),
      'colour': _jitter(rng, _WINDOW, 0.04).astype(np.float32),
  }
  return colour, spec


def _draw_sky(canvas: _Canvas, rng: np.random.Generator, clouds: np.ndarray,
              overcast: bool) -> np.ndarray:
  """Fills the albedo with a sky gradient and returns the horizon colour."""
  if overcast:
    zenith = _jitter(rng, (0.66, 0.70, 0.76), 0.05)
    horizon = _jitter(rng, (0.80, 0.82, 0.85), 0.04)
  else:
    zenith = _jitter(rng, (0.30, 0.50, 0.85), 0.06)
    horizon = _jitter(rng, (0.72, 0.82, 0.92), 0.04)
  elevation = np.clip((canvas.vh - canvas.v) / canvas.f / 0.6, 0, 1)[:, None, None]
  sky = (horizon * (1 - elevation) + zenith * elevation).astype(np.float32)
  cloud = np.clip(clouds * 1.5 - 0.1, 0, 1)[..., None] * np.float32(0.5 if overcast else 0.8)
  canvas.albedo[:] = sky * (1 - cloud) + np.array([0.95, 0.95, 0.96], dtype=np.float32) * cloud
  return horizon


def _draw_ground(canvas: _Canvas, rng: np.random.Generator, street: dict) -> None:
  """Draws the ground plane: road, markings, curbs, sidewalks and grass."""
  dv = canvas.v - canvas.vh
  z_row = np.full(canvas.height, np.inf)
  below = dv > 0
  z_row[below] = canvas.f * canvas.h / dv[below]
  rows = np.flatnonzero(below)
  road_col = _jitter(rng, _ROAD, 0.04)
  walk_col = _pick(rng, _SIDEWALK, 0.04)
  grass_col = _jitter(rng, _GRASS, 0.05)
  tile = rng.uniform(0.4, 0.8)
  dash_period = rng.uniform(6.0, 12.0)
  if rows.size == 0:
    return
  z = z_row[rows][:, None]
  x = (canvas.u - canvas.cx)[None, :] / canvas.f * z
  fp_x = z / canvas.f
  fp_z = z * z / (canvas.f * canvas.h)

  left = x < 0
  dist = np.abs(x)
  road_edge = np.where(left, street['road_left'], street['road_right'])
  walk_edge = road_edge + np.where(left, street['walk_left'], street['walk_right'])
  wall = np.where(left, street['wall_left'], street['wall_right'])
  open_side = np.where(left, street['open_left'], street['open_right'])
  beyond = dist > wall
  grass = ((dist > walk_edge) & ~beyond) | (beyond & open_side)
  road = dist <= road_edge

  grain = canvas.grain[rows]
  blotch = canvas.blotch[rows]
  centre = street['centre_line']

  # Markings: a dashed centre line and solid edge lines, each 15 cm wide and
  # antialiased with the pixel footprint so they fade out with distance
  # instead of aliasing into speckle.
  dashes = _box_coverage(z, dash_period, 0.4, fp_z)
  marks = _interval_coverage(x, centre - 0.075, centre + 0.075, fp_x) * dashes
  for edge in (-street['road_left'] + 0.3, street['road_right'] - 0.3):
    marks = marks + _interval_coverage(x, edge - 0.075, edge + 0.075, fp_x)
  marks = np.clip(marks, 0, 1)[..., None] * 0.85
  road_albedo = road_col * (1 + 0.08 * grain + 0.08 * blotch)[..., None]
  road_albedo = road_albedo * (1 - marks) + np.asarray(_MARKING) * marks

  joints = 1 - (1 - _box_coverage(x, tile, 0.08, fp_x)) * (1 - _box_coverage(z, tile, 0.08, fp_z))
  curb = _interval_coverage(dist, road_edge, road_edge + 0.25, fp_x)
  walk_albedo = walk_col * (1 + 0.06 * grain - 0.18 * joints + 0.15 * curb)[..., None]
  grass_albedo = grass_col * (1 + 0.15 * grain + 0.15 * blotch)[..., None]

  albedo = np.where(road[..., None], road_albedo,
                    np.where(grass[..., None], grass_albedo, walk_albedo))
  canvas.albedo[rows] = albedo
  canvas.zbuf[rows] = z
  canvas.label[rows] = np.where(grass, _NATURE, _FLAT)
  canvas.nid[rows] = _N_GROUND


def _draw_wall(canvas: _Canvas, rng: np.random.Generator, side: int, offset: float,
               z_start: float, z_end: float) -> None:
  """Draws a row of buildings on the wall plane x = side * offset.

  Args:
    canvas: target canvas.
    rng: layout stream.
    side: -1 for the left wall, +1 for the right wall.
    offset: distance of the wall plane from the camera (metres).
    z_start: depth where the first building starts.
    z_end: depth where the last building ends.
  """
  starts, ends, heights, colours, specs = [], [], [], [], []
  z = z_start
  while z < z_end:
    length = rng.uniform(6.0, 25.0)
    colour, spec = _building(rng)
    height = rng.uniform(6.0, 24.0)
    spec['top'] = height
    starts.append(z)
    ends.append(min(z + length, z_end))
    heights.append(height)
    colours.append(colour)
    specs.append(spec)
    z += length
    if rng.random() < 0.2:
      z += rng.uniform(3.0, 10.0)
  if not starts:
    return
  starts, ends, heights = np.array(starts), np.array(ends), np.array(heights)

  du = (canvas.u - canvas.cx) * side
  cols = np.flatnonzero(du > 0)
  # The wall plane x = side * offset is hit at Z = offset * f / |u - cx|, one
  # depth per column.
  z_col = offset * canvas.f / du[cols]
  idx = np.clip(np.searchsorted(starts, z_col, side='right') - 1, 0, None)
  hit = (z_col >= starts[idx]) & (z_col < ends[idx])
  cols, z_col, idx = cols[hit], z_col[hit], idx[hit]
  if cols.size == 0:
    return
  y = (canvas.v[:, None] - canvas.vh) * z_col[None, :] / canvas.f
  height_above = canvas.h - y
  cover = (height_above > 0) & (height_above <= heights[idx][None, :])
  win = cover & (z_col[None, :] < canvas.zbuf[:, cols])

  albedo = np.asarray(colours, dtype=np.float32)[idx][None, :, :]
  albedo = albedo * (1 + 0.05 * canvas.grain[:, cols] + 0.06 * canvas.blotch[:, cols])[..., None]
  spec = {key: np.array([s[key] for s in specs])[idx] for key in ('period', 'duty', 'phase', 'top')}
  spec['colour'] = np.asarray([s['colour'] for s in specs], dtype=np.float32)[idx][None, :, :]
  along = z_col - starts[idx]
  fp_along = z_col * z_col / (canvas.f * offset)
  albedo = _windows(albedo, along[None, :], fp_along[None, :], height_above,
                    (z_col / canvas.f)[None, :], spec)

  zbuf = canvas.zbuf[:, cols]
  canvas.zbuf[:, cols] = np.where(win, z_col[None, :], zbuf)
  canvas.label[:, cols] = np.where(win, _CONSTRUCTION, canvas.label[:, cols])
  nid = _N_LEFT_WALL if side < 0 else _N_RIGHT_WALL
  canvas.nid[:, cols] = np.where(win, nid, canvas.nid[:, cols])
  canvas.albedo[:, cols] = np.where(win[..., None], albedo, canvas.albedo[:, cols])


def _draw_facade(canvas: _Canvas, rng: np.random.Generator, z: float, x_from: float,
                 x_to: float) -> None:
  """Closes the street with fronto-parallel building blocks at depth `z`."""
  x = x_from
  while x < x_to:
    block = rng.uniform(6.0, 18.0)
    colour, spec = _building(rng)
    height = rng.uniform(8.0, 28.0)
    spec['top'] = height
    canvas.fronto(z, x, min(x + block, x_to), canvas.h - height, canvas.h, _CONSTRUCTION,
                  colour, windows=spec)
    x += block


def _sample_depth(rng: np.random.Generator, x: float, z_min: float, z_max: float) -> float:
  """Depth in [z_min, z_max] at which lateral position `x` is on screen."""
  lo = max(z_min, abs(x) / _VISIBLE_TAN)
  return float(rng.uniform(lo, max(z_max, lo + 5.0)))


def _draw_pole(canvas: _Canvas, rng: np.random.Generator, street: dict, z_max: float) -> None:
  """Draws a street lamp, a sign or a traffic light at the kerb."""
  side = -1 if rng.random() < 0.5 else 1
  x = side * ((street['road_left'] if side < 0 else street['road_right']) + 0.5)
  z = _sample_depth(rng, x, 5.0, z_max)
  h = canvas.h
  kind = rng.integers(3)
  pole = _jitter(rng, _POLE, 0.05)
  width = rng.uniform(0.10, 0.18)
  if kind == 0:  # street lamp with an arm over the road
    top = rng.uniform(6.0, 8.5)
    reach = rng.uniform(1.0, 2.2)
    canvas.fronto(z, x - width / 2, x + width / 2, h - top, h, _OBJECT, pole)
    arm = sorted((x, x - side * reach))
    canvas.fronto(z, arm[0], arm[1], h - top, h - top + 0.15, _OBJECT, pole)
    lamp = x - side * reach
    canvas.fronto(z, lamp - 0.3, lamp + 0.3, h - top, h - top + 0.25, _OBJECT,
                  _jitter(rng, (0.9, 0.88, 0.7), 0.05))
  elif kind == 1:  # sign pole
    top = rng.uniform(2.6, 3.6)
    size = rng.uniform(0.5, 0.9)
    canvas.fronto(z, x - width / 2, x + width / 2, h - top + size, h, _OBJECT, pole)
    canvas.fronto(z, x - size / 2, x + size / 2, h - top, h - top + size, _OBJECT,
                  _pick(rng, _SIGN, 0.05), ellipse=rng.random() < 0.5)
  else:  # traffic light
    top = rng.uniform(3.2, 4.2)
    canvas.fronto(z, x - width / 2, x + width / 2, h - top, h, _OBJECT, pole)
    canvas.fronto(z, x - 0.2, x + 0.2, h - top - 0.5, h - top + 0.6, _OBJECT,
                  _jitter(rng, (0.14, 0.14, 0.12), 0.03))
    lit = rng.integers(3)
    lamp = np.array([(0.95, 0.15, 0.1), (0.95, 0.75, 0.1), (0.2, 0.9, 0.3)])[lit]
    y = h - top - 0.35 + 0.35 * lit
    canvas.fronto(z, x - 0.12, x + 0.12, y - 0.12, y + 0.12, _OBJECT, lamp, ellipse=True)


def _draw_vehicle(canvas: _Canvas, rng: np.random.Generator, street: dict) -> None:
  """Draws a car, van or bus seen from behind, somewhere across the road."""
  kind = rng.choice(3, p=(0.7, 0.18, 0.12))
  width, height = ((1.8, 1.45), (2.0, 2.1), (2.5, 3.2))[kind]
  width *= rng.uniform(0.95, 1.05)
  height *= rng.uniform(0.95, 1.05)
  lo, hi = -street['road_left'] + width / 2 + 0.2, street['road_right'] - width / 2 - 0.2
  x = float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2
  z = _sample_depth(rng, abs(x) + width / 2, 6.0, 60.0)
  body = _pick(rng, _CAR, 0.05)
  h = canvas.h
  half = width / 2
  if kind == 2:
    canvas.fronto(z, x - half, x + half, h - height, h - 0.35, _VEHICLE, body)
    canvas.fronto(z, x - half + 0.15, x + half - 0.15, h - height + 0.3, h - height + 1.3,
                  _VEHICLE, _jitter(rng, _CAR_GLASS, 0.03))
    belt = h - 0.35
  else:
    cabin = 0.42 if kind == 0 else 0.15
    canvas.fronto(z, x - half, x + half, h - (1 - cabin) * height, h - 0.25, _VEHICLE, body)
    canvas.fronto(z, x - 0.42 * width, x + 0.42 * width, h - height, h - (1 - cabin) * height,
                  _VEHICLE, body)
    canvas.fronto(z, x - 0.36 * width, x + 0.36 * width, h - 0.95 * height,
                  h - (1 - cabin) * height - 0.05, _VEHICLE, _jitter(rng, _CAR_GLASS, 0.03))
    belt = h - 0.25
  for sign in (-1, 1):
    outer = x + sign * (half - 0.05)
    inner = x + sign * (half - 0.32)
    canvas.fronto(z, min(outer, inner), max(outer, inner), belt - 0.05, h, _VEHICLE, _TYRE,
                  grain=0.1)
    lamp = x + sign * (half - 0.15)
    canvas.fronto(z, lamp - 0.12, lamp + 0.12, belt - 0.45, belt - 0.3, _VEHICLE, _TAIL_LIGHT)


def _draw_person(canvas: _Canvas, rng: np.random.Generator, street: dict) -> None:
  """Draws a pedestrian standing on one of the sidewalks."""
  side = -1 if rng.random() < 0.5 else 1
  edge = street['road_left'] if side < 0 else street['road_right']
  walk = street['walk_left'] if side < 0 else street['walk_right']
  x = side * (edge + rng.uniform(0.4, max(walk - 0.4, 0.5)))
  z = _sample_depth(rng, abs(x) + 0.3, 5.0, 35.0)
  scale = rng.uniform(0.85, 1.1)
  tall = 1.75 * scale
  shirt = _pick(rng, _SHIRT, 0.06)
  pants = _pick(rng, _PANTS, 0.04)
  skin = _jitter(rng, _SKIN, 0.08)
  h = canvas.h
  top = h - tall
  hip = h - 0.48 * tall
  canvas.fronto(z, x - 0.25 * scale, x + 0.25 * scale, top + 0.15 * tall, hip + 0.05, _HUMAN,
                shirt)
  for sign in (-1, 1):
    a, b = x + sign * 0.03 * scale, x + sign * 0.18 * scale
    canvas.fronto(z, min(a, b), max(a, b), hip, h, _HUMAN, pants)
  canvas.fronto(z, x - 0.1 * scale, x + 0.1 * scale, top, top + 0.16 * tall, _HUMAN, skin,
                ellipse=True)


def _draw_tree(canvas: _Canvas, rng: np.random.Generator, x: float, z: float,
               max_radius: float) -> None:
  """Draws a tree (trunk plus a lumpy crown of ellipses) at (x, z).

  Args:
    canvas: target canvas.
    rng: layout stream.
    x: lateral position of the trunk (metres).
    z: depth (metres).
    max_radius: the crown's largest half width (metres).
  """
  h = canvas.h
  trunk = rng.uniform(1.8, 3.2)
  rx = max(max_radius, 0.5) * rng.uniform(0.6, 1.0)
  ry = rng.uniform(1.4, 3.0)
  leaves = _pick(rng, _FOLIAGE, 0.04)
  canvas.fronto(z, x - 0.16, x + 0.16, h - trunk - ry, h, _NATURE, _jitter(rng, _TRUNK, 0.04))
  cy = h - trunk - ry * 0.8
  for dx, dy, r in ((0.0, 0.0, 1.0), (-0.45, 0.25, 0.55), (0.45, 0.2, 0.55)):
    canvas.fronto(z, x + dx * rx - r * rx, x + dx * rx + r * rx, cy + dy * ry - r * ry,
                  cy + dy * ry + r * ry, _NATURE, leaves * rng.uniform(0.85, 1.1),
                  grain=0.2, ellipse=True)


def _draw_bonnet(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
  """Marks a curved ego-vehicle bonnet at the bottom as void; returns its mask."""
  base = rng.uniform(0.04, 0.08)
  bulge = rng.uniform(0.02, 0.05)
  t = (canvas.u - canvas.cx) / canvas.cx
  edge = canvas.height * (1 - base - bulge * (1 - t * t))
  mask = canvas.v[:, None] >= edge[None, :]
  canvas.zbuf[mask] = np.inf
  canvas.label[mask] = _VOID
  canvas.nid[mask] = _N_NONE
  return mask


def render_scene(index: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Renders one synthetic street scene.

  Args:
    index: scene index; each index is a different scene.
    height: image height in pixels (positive).
    width: image width in pixels (positive).
    seed: data set seed; (index, seed) fixes the scene at every resolution.

  Returns:
    A dict with
      'image': (H, W, 3) float32 RGB in [0, 1];
      'label': (H, W) int32 class ids in 0..6, -1 for void pixels;
      'depth': (H, W, 1) float32 inverse depth 1 / Z (1/m), clipped to at most
        0.5, exactly 0 on sky and void pixels;
      'normal': (H, W, 3) float32 unit surface normals in camera coordinates
        (x right, y down, z forward) facing the camera, zero where depth is 0.

  Raises:
    ConfigError: if height or width is not a positive integer.
  """
  for name, value in (('height', height), ('width', width)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ConfigError(f'synthetic scene {name} must be a positive integer, got {value!r}')
  height, width = int(height), int(width)
  # Two independent streams: the layout stream makes the same number of draws
  # at every resolution, so the scene does not change with the image size.
  layout_seq, pixel_seq = np.random.SeedSequence([seed, index]).spawn(2)
  rng = np.random.default_rng(layout_seq)
  pixel_rng = np.random.default_rng(pixel_seq)

  cam_height = rng.uniform(1.2, 1.8)
  horizon = height / 2 + width * rng.uniform(-0.04, 0.015)
  overcast = rng.random() < 0.4
  blotch = _smooth_noise(rng, (12, 24), height, width)
  clouds = _smooth_noise(rng, (6, 12), height, width)
  grain = pixel_rng.standard_normal((height, width), dtype=np.float32)
  canvas = _Canvas(height, width, cam_height, horizon, grain, blotch)

  open_side = rng.integers(-1, 2) if rng.random() < 0.3 else 0
  street = {
      'road_left': rng.uniform(2.5, 6.5),
      'road_right': rng.uniform(3.0, 8.0),
      'walk_left': rng.uniform(1.8, 4.5),
      'walk_right': rng.uniform(1.8, 4.5),
      'open_left': open_side < 0,
      'open_right': open_side > 0,
  }
  verge_left = rng.uniform(1.0, 3.0) if rng.random() < 0.35 else 0.0
  verge_right = rng.uniform(1.0, 3.0) if rng.random() < 0.35 else 0.0
  street['wall_left'] = street['road_left'] + street['walk_left'] + verge_left
  street['wall_right'] = street['road_right'] + street['walk_right'] + verge_right
  street['centre_line'] = rng.uniform(-street['road_left'] + 2.0, street['road_right'] - 2.0)

  horizon_colour = _draw_sky(canvas, rng, clouds, overcast)
  _draw_ground(canvas, rng, street)

  has_facade = rng.random() < 0.7 or open_side != 0
  z_end = rng.uniform(35.0, 110.0) if has_facade else rng.uniform(80.0, 220.0)
  for side, key in ((-1, 'left'), (1, 'right')):
    if not street[f'open_{key}']:
      _draw_wall(canvas, rng, side, street[f'wall_{key}'], rng.uniform(0.0, 6.0), z_end)
  if has_facade:
    _draw_facade(canvas, rng, z_end, -street['wall_left'] - 25.0, street['wall_right'] + 25.0)

  # Trees stand along the sidewalks or on open grass; crowns are kept narrower
  # than the gap to the wall so they never cut into it.
  for _ in range(rng.integers(0, 5) + (4 if open_side else 0)):
    side = -1 if (open_side < 0 or (open_side == 0 and rng.random() < 0.5)) else 1
    key = 'left' if side < 0 else 'right'
    road, wall = street[f'road_{key}'], street[f'wall_{key}']
    if street[f'open_{key}']:
      x = side * (wall + rng.uniform(0.5, 12.0))
      room = 2.5
    else:
      x = side * (road + rng.uniform(0.6, max(0.7, wall - road - 1.0)))
      room = min(wall - abs(x) - 0.1, 2.5)
    _draw_tree(canvas, rng, x, _sample_depth(rng, abs(x), 6.0, 60.0), room)
  for _ in range(rng.integers(0, 5)):
    _draw_person(canvas, rng, street)
  for _ in range(rng.integers(0, 5)):
    _draw_vehicle(canvas, rng, street)
  # At least one pole close enough to be seen, so that every scene shows the
  # rare 'object' class.
  _draw_pole(canvas, rng, street, 20.0)
  for _ in range(rng.integers(0, 3)):
    _draw_pole(canvas, rng, street, 45.0)

  light = np.array([rng.uniform(-0.8, 0.8), -rng.uniform(0.6, 1.2), -rng.uniform(-0.3, 0.8)])
  light /= np.linalg.norm(light)
  ambient = rng.uniform(0.7, 0.8) if overcast else rng.uniform(0.45, 0.6)
  haze_distance = rng.uniform(120.0, 250.0) if overcast else rng.uniform(200.0, 450.0)
  bonnet = _draw_bonnet(canvas, rng) if rng.random() < 0.3 else None
  bonnet_colour = _jitter(rng, _BONNET, 0.04)

  shade = ambient + (1 - ambient) * np.clip(_NORMALS @ light, 0, 1)
  shade[_N_NONE] = 1.0
  finite = np.isfinite(canvas.zbuf)
  z = np.where(finite, canvas.zbuf, 0)
  haze = np.where(finite, 0.85 * (1 - np.exp(-z / haze_distance)), 0).astype(np.float32)[..., None]
  image = canvas.albedo * shade.astype(np.float32)[canvas.nid][..., None]
  image = image * (1 - haze) + horizon_colour.astype(np.float32) * haze
  if bonnet is not None:
    # A vertical gradient reads as a curved, glossy bonnet.
    gloss = np.clip((canvas.v / height - 0.85) * 2, 0, 0.3)[:, None, None]
    image = np.where(bonnet[..., None], (bonnet_colour + gloss).astype(np.float32), image)
  image += np.float32(0.02) * pixel_rng.standard_normal(image.shape, dtype=np.float32)

  depth = np.minimum(1 / canvas.zbuf, _MAX_INV_DEPTH).astype(np.float32)
  return {
      'image': np.clip(image, 0, 1).astype(np.float32),
      'label': canvas.label,
      'depth': depth[..., None],
      'normal': _NORMALS[canvas.nid],
  }


def render_scenes(indices: Iterable[int], height: int, width: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Renders several scenes and stacks each field along a new leading axis.

  Args:
    indices: scene indices.
    height: image height in pixels.
    width: image width in pixels.
    seed: data set seed.

  Returns:
    The dict of `render_scene` with every array stacked along axis 0.

  Raises:
    ConfigError: if `indices` is empty.
  """
  scenes = [render_scene(int(i), height, width, seed) for i in indices]
  if not scenes:
    raise ConfigError('render_scenes needs at least one index')
  return {key: np.stack([s[key] for s in scenes]) for key in scenes[0]}
