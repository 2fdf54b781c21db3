"""A Matplotlib stand-in: listing 6.11's pyplot calls recorded, and the figure drawn by
hand as an SVG file (loss or accuracy against epochs, examples seen on a top axis)."""
import math
from xml.sax.saxutils import escape
from beyond.files import write_atomically

WIDTH, HEIGHT = 500, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 48, 44  # the margins around the axes
COLORS = ["#1f77b4", "#ff7f0e"]  # Matplotlib's first two
DASHES = {"-": "", "--": ' stroke-dasharray="7 4"', "-.": ' stroke-dasharray="7 3 2 3"',
          ":": ' stroke-dasharray="2 3"'}  # Matplotlib's line styles
TRAIN_STYLE = f'stroke="{COLORS[0]}"'
VALIDATION_STYLE = f'stroke="{COLORS[1]}"{DASHES["--"]}'
CHANCE_STYLE = 'stroke="#999" stroke-dasharray="3 3"'


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    ticks = []
    while not ticks or ticks[-1] < hi - 1e-9:
        ticks.append(round((first + len(ticks)) * step, 10))
    return ticks


def scales(x_ticks, y_ticks):
    """Data to SVG coordinates, x from 0 and y from the first tick to the last."""
    return (lambda x: LEFT + (WIDTH - LEFT - RIGHT) * x / x_ticks[-1],
            lambda y: HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (y - y_ticks[0])
            / (y_ticks[-1] - y_ticks[0]))


def svg_axes(y_label, bottom_ticks, top_ticks, left_ticks, x_label, top_label):
    """The frame, ticks and axis labels; ticks are (position, value) pairs."""
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
           f'height="{HEIGHT - TOP - BOTTOM}" fill="none" stroke="black"/>']
    for ticks, y, tick, text in [(bottom_ticks, HEIGHT - BOTTOM, 4, 16), (top_ticks, TOP, -4, -7)]:
        for x, value in ticks:
            svg += [f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + tick}" stroke="black"/>',
                    f'<text x="{x:.1f}" y="{y + text}" text-anchor="middle">{value:g}</text>']
    for y, value in left_ticks:
        svg += [f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="black"/>',
                f'<text x="{LEFT - 7}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>']
    middle = (LEFT + WIDTH - RIGHT) / 2
    return svg + [
        f'<text x="{middle}" y="{HEIGHT - 8}" text-anchor="middle">{x_label}</text>',
        f'<text x="{middle}" y="14" text-anchor="middle">{top_label}</text>',
        f'<text transform="translate(16 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{y_label}</text>']


def svg_curve(points, style):
    if len(points) == 1:  # a polyline of one point is invisible
        return f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="3" {style}/>'
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke-width="1.8" {style}/>'


def plot_unit_square(path, title, x_label, y_label, curves, key_corner="bottom right"):
    """Curves [(name, points, style)] on axes from 0 to 1, as an SVG in the loss plot's style."""
    ticks = nice_ticks(0.0, 1.0)
    sx, sy = scales(ticks, ticks)
    svg = svg_axes(y_label.capitalize(), [(sx(t), t) for t in ticks], [],
                   [(sy(t), t) for t in ticks], x_label, escape(title))
    svg += [svg_curve([(sx(x), sy(y)) for x, y in points], style)
            for _, points, style in curves if points]
    svg += svg_key([(escape(name), style) for name, _, style in curves], key_corner)
    write_atomically(path, "\n".join(svg + ["</svg>"]) + "\n")


def svg_key(entries, corner, first_row=12):
    """The legend of (name, style) entries, in a corner ("top left"...) the curves leave empty."""
    width = 48 + 6.4 * max(len(name) for name, _ in entries)
    x = LEFT + 10 if corner.endswith("left") else WIDTH - RIGHT - 10 - width
    height = 8 + 16 * len(entries)
    y = TOP + 10 if corner.startswith("top") else HEIGHT - BOTTOM - 10 - height
    svg = [f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{height}" fill="white" '
           f'stroke="#ccc"/>']
    for row, (name, style) in enumerate(entries):
        line_y = y + first_row + 16 * row
        svg += [f'<line x1="{x + 8:.1f}" y1="{line_y}" x2="{x + 34:.1f}" y2="{line_y}" '
                f'stroke-width="1.8" {style}/>',
                f'<text x="{x + 40:.1f}" y="{line_y + 4}">{name}</text>']
    return svg


class Axes:
    """What listing 6.11 gives one set of axes (Matplotlib's Axes): curves and labels."""

    def __init__(self, figure):
        self.figure, self.lines, self.labels = figure, [], {}
        figure.axes.append(self)

    def plot(self, x, y, label=None, linestyle="-", alpha=1.0):
        # alpha=0, the listing's invisible curve, is not drawn: it only places the top axis
        style = f'stroke="{COLORS[len(self.lines) % 2]}"{DASHES[linestyle]}'
        self.lines.append(([float(v) for v in x], [float(v) for v in y], label, style))

    def set_xlabel(self, text):
        self.labels["x"] = text

    def set_ylabel(self, text):
        self.labels["y"] = text

    def legend(self):
        pass  # savefig draws a legend of the labelled curves

    def twiny(self):
        return Axes(self.figure)


class PyPlot:
    """matplotlib.pyplot's and its figure's calls of listing 6.11; savefig writes it whole."""

    def subplots(self, figsize=None):
        self.axes = []
        return self, Axes(self)

    def tight_layout(self):
        pass  # the SVG's margins are fixed

    def savefig(self, path):
        """The curves against epochs (the first axes), examples seen on the top axis (the
        second: the book's ax1.twiny()), a legend."""
        first, top = self.axes
        epochs_seen, examples_seen = first.lines[0][0], top.lines[0][0]
        values = [v for _, curve, _, _ in first.lines for v in curve if math.isfinite(v)]
        y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
        x_ticks = nice_ticks(0.0, epochs_seen[-1] if epochs_seen[-1] > 0 else 1.0)
        sx, sy = scales(x_ticks, y_ticks)
        # the top axis: examples seen grow linearly with the epochs
        per_epoch = examples_seen[-1] / epochs_seen[-1] if epochs_seen[-1] else 0
        top_ticks = [(sx(n / per_epoch), n)
                     for n in nice_ticks(0.0, max(per_epoch * x_ticks[-1], 1))
                     if n <= per_epoch * x_ticks[-1] + 1e-9] if per_epoch else []
        ends = [v[-1] for _, v, _, _ in first.lines if len(v) and math.isfinite(v[-1])]
        curves_end_high = bool(ends) and sum(ends) / len(ends) > (y_ticks[0] + y_ticks[-1]) / 2
        svg = svg_axes(escape(first.labels["y"]), [(sx(x), x) for x in x_ticks], top_ticks,
                       [(sy(y), y) for y in y_ticks], escape(first.labels["x"]),
                       escape(top.labels["x"]))
        for _, curve, _, style in first.lines:
            svg.append(svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, curve)
                                  if math.isfinite(y)], style))
        svg += svg_key([(escape(name), style) for _, _, name, style in first.lines],
                       "bottom right" if curves_end_high else "top right", first_row=13)
        write_atomically(path, "\n".join(svg + ["</svg>"]) + "\n")


plt = PyPlot()
