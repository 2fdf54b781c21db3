"""A Matplotlib stand-in: the chapter's plots as SVG files, drawn by hand.

plt takes listing 6.11's calls as matplotlib.pyplot does (subplots, plot,
set_xlabel, set_ylabel, legend, twiny, tight_layout, savefig), records them, and
savefig draws the figure: the loss or accuracy curves against epochs, with the
examples seen on a top axis."""
import math
from xml.sax.saxutils import escape
from beyond.files import write_atomically


SVG_SIZE = {"width": 500, "height": 300, "left": 64, "right": 16, "top": 48, "bottom": 44}


TRAIN_STYLE = 'stroke="#1f77b4"'                              # solid, as in the chapter


VALIDATION_STYLE = 'stroke="#ff7f0e" stroke-dasharray="7 4"'  # dashed


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


def svg_figure(epochs_seen, examples_seen, train_values, val_values, label):
    """What plot_values asks of Matplotlib, as the text of an SVG file: training
    (solid) and validation (dashed) values against epochs (bottom axis) and
    examples seen (top axis, the book's ax2 = ax1.twiny()), with a legend."""
    epochs_seen, examples_seen = list(map(float, epochs_seen)), list(map(float, examples_seen))
    values = [v for v in list(train_values) + list(val_values) if math.isfinite(v)]
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    x_ticks = nice_ticks(0.0, epochs_seen[-1] if epochs_seen[-1] > 0 else 1.0)
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))

    def sx(epoch):
        return left + (w - left - right) * epoch / x_ticks[-1]

    def sy(value):
        return h - bottom - (h - top - bottom) * (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])

    # the top axis: examples seen grow linearly with the epochs
    per_epoch = examples_seen[-1] / epochs_seen[-1] if epochs_seen[-1] else 0
    top_ticks = [(sx(n / per_epoch), n) for n in nice_ticks(0.0, max(per_epoch * x_ticks[-1], 1))
                 if n <= per_epoch * x_ticks[-1] + 1e-9] if per_epoch else []
    ends = [v[-1] for v in (train_values, val_values) if len(v) and math.isfinite(v[-1])]
    curves_end_high = bool(ends) and sum(ends) / len(ends) > (y_ticks[0] + y_ticks[-1]) / 2
    svg = (svg_axes(label, [(sx(x), x) for x in x_ticks], top_ticks, [(sy(y), y) for y in y_ticks])
           + [svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, train_values)
                         if math.isfinite(y)], TRAIN_STYLE),
              svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, val_values)
                         if math.isfinite(y)], VALIDATION_STYLE)]
           + svg_legend(label, at_bottom=curves_end_high) + ["</svg>"])
    return "\n".join(svg) + "\n"


def svg_axes(label, bottom_ticks, top_ticks, left_ticks, x_label="Epochs",
             top_label="Examples seen"):
    """The frame, ticks and axis labels; ticks are (position, value) pairs."""
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
           f'fill="none" stroke="black"/>']
    for x, value in bottom_ticks:
        svg += [f'<line x1="{x:.1f}" y1="{h - bottom}" x2="{x:.1f}" y2="{h - bottom + 4}" '
                f'stroke="black"/>',
                f'<text x="{x:.1f}" y="{h - bottom + 16}" text-anchor="middle">{value:g}</text>']
    for x, value in top_ticks:
        svg += [f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top - 4}" stroke="black"/>',
                f'<text x="{x:.1f}" y="{top - 7}" text-anchor="middle">{value:g}</text>']
    for y, value in left_ticks:
        svg += [f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="black"/>',
                f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>']
    middle = (left + w - right) / 2
    return svg + [
        f'<text x="{middle}" y="{h - 8}" text-anchor="middle">{x_label}</text>',
        f'<text x="{middle}" y="14" text-anchor="middle">{top_label}</text>',
        f'<text transform="translate(16 {(top + h - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{label.capitalize()}</text>']


def svg_curve(points, style):
    if len(points) == 1:  # a polyline of one point is invisible
        return f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="3" {style}/>'
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke-width="1.8" {style}/>'


def svg_legend(label, at_bottom):
    """Top right, or bottom right where the curves end high (accuracy)."""
    width = 48 + 6.4 * len(f"Validation {label}")
    x = SVG_SIZE["width"] - SVG_SIZE["right"] - 10 - width
    y = SVG_SIZE["height"] - SVG_SIZE["bottom"] - 50 if at_bottom else SVG_SIZE["top"] + 10
    svg = [f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="40" fill="white" '
           f'stroke="#ccc"/>']
    for row, (name, style) in enumerate([("Training", TRAIN_STYLE),
                                         ("Validation", VALIDATION_STYLE)]):
        line_y = y + 13 + 16 * row
        svg += [f'<line x1="{x + 8:.1f}" y1="{line_y}" x2="{x + 34:.1f}" y2="{line_y}" '
                f'stroke-width="1.8" {style}/>',
                f'<text x="{x + 40:.1f}" y="{line_y + 4}">{name} {label}</text>']
    return svg


CHANCE_STYLE = 'stroke="#999" stroke-dasharray="3 3"'


def plot_unit_square(path, title, x_label, y_label, curves, key_corner="bottom right"):
    """Curves [(name, points, style)] on axes from 0 to 1, written as an SVG in the
    loss plot's style, the title where the loss plot has its top axis."""
    ticks = nice_ticks(0.0, 1.0)
    w, h = SVG_SIZE["width"], SVG_SIZE["height"]
    left, right, top, bottom = (SVG_SIZE[k] for k in ("left", "right", "top", "bottom"))

    def sx(x):
        return left + (w - left - right) * x

    def sy(y):
        return h - bottom - (h - top - bottom) * y

    svg = svg_axes(y_label, [(sx(t), t) for t in ticks], [], [(sy(t), t) for t in ticks],
                   x_label=x_label, top_label=escape(title))
    svg += [svg_curve([(sx(x), sy(y)) for x, y in points], style)
            for _, points, style in curves if points]
    svg += svg_key([(escape(name), style) for name, _, style in curves], key_corner)
    write_atomically(path, "\n".join(svg + ["</svg>"]) + "\n")


def svg_key(entries, corner):
    """The legend of (name, style) entries in a corner ("top left", "bottom right"...)
    that the curves leave empty."""
    width = 48 + 6.4 * max(len(name) for name, _ in entries)
    x = SVG_SIZE["left"] + 10 if corner.endswith("left") else \
        SVG_SIZE["width"] - SVG_SIZE["right"] - 10 - width
    height = 8 + 16 * len(entries)
    y = SVG_SIZE["top"] + 10 if corner.startswith("top") else \
        SVG_SIZE["height"] - SVG_SIZE["bottom"] - 10 - height
    svg = [f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{height}" fill="white" '
           f'stroke="#ccc"/>']
    for row, (name, style) in enumerate(entries):
        line_y = y + 12 + 16 * row
        svg += [f'<line x1="{x + 8:.1f}" y1="{line_y}" x2="{x + 34:.1f}" y2="{line_y}" '
                f'stroke-width="1.8" {style}/>',
                f'<text x="{x + 40:.1f}" y="{line_y + 4}">{name}</text>']
    return svg


class Axes:
    """The curves and labels one set of axes was given (Matplotlib's Axes)."""

    def __init__(self, figure):
        self.figure, self.lines, self.xlabel, self.ylabel = figure, [], None, None
        figure.axes.append(self)

    def plot(self, x, y, label=None, linestyle="-", alpha=1.0):
        # the styles are the chapter's own: solid training, dashed validation
        self.lines.append(([float(v) for v in x], [float(v) for v in y], label))

    def set_xlabel(self, text):
        self.xlabel = text

    def set_ylabel(self, text):
        self.ylabel = text

    def legend(self):
        pass  # every figure here has its legend

    def twiny(self):
        return Axes(self.figure)


class Figure:
    def __init__(self):
        self.axes = []

    def tight_layout(self):
        pass  # the SVG's margins are fixed

    def svg(self):
        """The figure plot_values draws: two curves against epochs (the first axes),
        examples seen on the top axis (the second)."""
        (epochs, train_values, train_label), (_, val_values, _) = self.axes[0].lines[:2]
        examples = self.axes[1].lines[0][0]
        label = train_label.removeprefix("Training ")
        return svg_figure(epochs, examples, train_values, val_values, label)


class PyPlot:
    """matplotlib.pyplot's calls of listing 6.11: savefig writes the figure that
    subplots made last (written whole or not at all)."""

    def __init__(self):
        self.figure = None

    def subplots(self, figsize=None):
        self.figure = Figure()
        return self.figure, Axes(self.figure)

    def savefig(self, path):
        write_atomically(path, self.figure.svg())


plt = PyPlot()
