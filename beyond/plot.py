"""A Matplotlib stand-in: listing 6.11's pyplot calls recorded, and the figure drawn by
hand as an SVG file (loss or accuracy against epochs, examples seen on a top axis)."""
import math
from xml.sax.saxutils import escape
from beyond.files import write_atomically

WIDTH, HEIGHT = 500, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 48, 44  # the margins around the axes
TRAIN_STYLE = 'stroke="#1f77b4"'  # solid, as in the chapter
VALIDATION_STYLE = 'stroke="#ff7f0e" stroke-dasharray="7 4"'  # dashed
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


def svg_figure(epochs_seen, examples_seen, train_values, val_values, label):
    """plot_values' figure as SVG text: training (solid) and validation (dashed) values
    against epochs, examples seen on the top axis (the book's ax1.twiny()), a legend."""
    values = [v for v in train_values + val_values if math.isfinite(v)]  # Axes.plot's lists
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    x_ticks = nice_ticks(0.0, epochs_seen[-1] if epochs_seen[-1] > 0 else 1.0)
    sx, sy = scales(x_ticks, y_ticks)
    # the top axis: examples seen grow linearly with the epochs
    per_epoch = examples_seen[-1] / epochs_seen[-1] if epochs_seen[-1] else 0
    top_ticks = [(sx(n / per_epoch), n) for n in nice_ticks(0.0, max(per_epoch * x_ticks[-1], 1))
                 if n <= per_epoch * x_ticks[-1] + 1e-9] if per_epoch else []
    ends = [v[-1] for v in (train_values, val_values) if len(v) and math.isfinite(v[-1])]
    curves_end_high = bool(ends) and sum(ends) / len(ends) > (y_ticks[0] + y_ticks[-1]) / 2
    svg = svg_axes(label, [(sx(x), x) for x in x_ticks], top_ticks, [(sy(y), y) for y in y_ticks])
    for curve, style in [(train_values, TRAIN_STYLE), (val_values, VALIDATION_STYLE)]:
        svg.append(svg_curve([(sx(x), sy(y)) for x, y in zip(epochs_seen, curve)
                              if math.isfinite(y)], style))
    svg += svg_key([(f"Training {label}", TRAIN_STYLE), (f"Validation {label}", VALIDATION_STYLE)],
                   "bottom right" if curves_end_high else "top right", first_row=13)
    return "\n".join(svg + ["</svg>"]) + "\n"


def svg_axes(label, bottom_ticks, top_ticks, left_ticks, x_label="Epochs",
             top_label="Examples seen"):
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
        f'text-anchor="middle">{label.capitalize()}</text>']


def svg_curve(points, style):
    if len(points) == 1:  # a polyline of one point is invisible
        return f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="3" {style}/>'
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke-width="1.8" {style}/>'


def plot_unit_square(path, title, x_label, y_label, curves, key_corner="bottom right"):
    """Curves [(name, points, style)] on axes from 0 to 1, as an SVG in the loss plot's style."""
    ticks = nice_ticks(0.0, 1.0)
    sx, sy = scales(ticks, ticks)
    svg = svg_axes(y_label, [(sx(t), t) for t in ticks], [], [(sy(t), t) for t in ticks],
                   x_label=x_label, top_label=escape(title))
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
    """The curves one set of axes was given (Matplotlib's Axes)."""

    def __init__(self, figure):
        self.figure, self.lines = figure, []
        figure.axes.append(self)

    def plot(self, x, y, label=None, linestyle="-", alpha=1.0):
        # the styles are the chapter's own: solid training, dashed validation
        self.lines.append(([float(v) for v in x], [float(v) for v in y], label))

    def legend(self, *text):
        pass  # svg_figure draws the chapter's axis labels and legend

    set_xlabel = set_ylabel = legend

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
        # two curves against epochs (the first axes), examples seen on the top axis (the second)
        (epochs, train_values, train_label), (_, val_values, _) = self.axes[0].lines[:2]
        write_atomically(path, svg_figure(epochs, self.axes[1].lines[0][0], train_values,
                                          val_values, train_label.removeprefix("Training ")))


plt = PyPlot()
