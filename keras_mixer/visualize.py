"""The paper's pictures as PNG files: token-mixing units, stem filters, curves, confusion.

Every `plot_*` function writes one PNG of `width` x `height` pixels and
returns its path. matplotlib is the `viz` extra (`pip install
'keras-mixer[viz]'`); the analysis functions need only NumPy.
"""

import csv
import pathlib

import numpy as np

DPI = 100


def _figure(width, height):
    # A bare `Figure` renders to files without pyplot: no global state, no
    # GUI backend, and a notebook's inline plotting is left as it was.
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "keras_mixer.visualize needs matplotlib: pip install 'keras-mixer[viz]'."
        ) from error
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _save(figure, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


# --- Token-mixing units (paper Fig. 5 and 6) -------------------------------------


def token_mixing_units(model, block=0):
    """The first-layer token-mixing weights of `block` as images, (units, grid_h, grid_w)."""
    import keras

    kernel = keras.ops.convert_to_numpy(
        model.get_layer(f"block_{block}").token_mixing.dense_0.kernel
    )
    (height, width, _), (patch_h, patch_w) = model.image_shape, model.patch_size
    # Tokens are in raster order over the patch grid.
    return kernel.T.reshape(kernel.shape[1], height // patch_h, width // patch_w)


def spatial_frequency(unit):
    """The power-weighted mean radial frequency of a 2D weight image (DC excluded), in cycles per grid."""
    unit = np.asarray(unit, np.float64)
    power = np.abs(np.fft.fft2(unit - unit.mean())) ** 2
    fy = np.fft.fftfreq(unit.shape[0]) * unit.shape[0]
    fx = np.fft.fftfreq(unit.shape[1]) * unit.shape[1]
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    total = power.sum()
    return float((power * radius).sum() / total) if total > 0 else 0.0


def pair_inverse_units(units):
    """Pairs each unit with its most negatively correlated partner, low frequency first.

    Greedy matching: the most anti-correlated pair over all units is taken
    first, then the next among the units left, and so on (an odd unit out
    is dropped). Returns a list of `(i, j, correlation, frequency)`, sorted
    by the pair's mean spatial frequency.
    """
    flat = np.asarray(units, np.float64).reshape(len(units), -1)
    correlation = np.corrcoef(flat)
    np.fill_diagonal(correlation, np.inf)
    free = set(range(len(flat)))
    pairs = []
    for index in np.argsort(correlation, axis=None):
        i, j = np.unravel_index(index, correlation.shape)
        if i < j and i in free and j in free:
            free -= {i, j}
            frequency = (spatial_frequency(units[i]) + spatial_frequency(units[j])) / 2
            pairs.append((int(i), int(j), float(correlation[i, j]), frequency))
    return sorted(pairs, key=lambda pair: pair[3])


def plot_token_mixing(model, path, block=0, max_pairs=32, width=800, height=800):
    """Paper Fig. 5/6: token-mixing units of `block`, each beside its inverse, low frequency first."""
    units = token_mixing_units(model, block)
    pairs = pair_inverse_units(units)[:max_pairs]
    columns = 8  # four pairs per row
    rows = max(1, int(np.ceil(2 * len(pairs) / columns)))
    figure = _figure(width, height)
    for k, (i, j, _, _) in enumerate(pairs):
        for side, unit in enumerate((units[i], units[j])):
            axis = figure.add_subplot(rows, columns, 2 * k + side + 1)
            limit = np.abs(unit).max() or 1.0
            axis.imshow(unit, cmap="RdBu_r", vmin=-limit, vmax=limit)
            axis.set_axis_off()
    figure.suptitle(f"block {block}: token-mixing units and their inverses, low frequency first")
    return _save(figure, path)


# --- Stem (paper Fig. 7) ---------------------------------------------------------


def stem_filters(model):
    """The patch-embedding kernels as images in [0, 1], (channels, patch_h, patch_w, 3)."""
    import keras

    kernel = keras.ops.convert_to_numpy(model.get_layer("stem").kernel)  # (ph, pw, in, C)
    filters = np.moveaxis(kernel, -1, 0)
    low = filters.min(axis=(1, 2, 3), keepdims=True)
    high = filters.max(axis=(1, 2, 3), keepdims=True)
    filters = (filters - low) / np.where(high > low, high - low, 1.0)
    if filters.shape[-1] == 1:
        filters = np.repeat(filters, 3, axis=-1)
    return filters


def plot_stem(model, path, max_filters=64, width=800, height=800):
    """Paper Fig. 7: the first `max_filters` stem filters as small RGB images."""
    filters = stem_filters(model)[:max_filters]
    columns = int(np.ceil(np.sqrt(len(filters))))
    rows = int(np.ceil(len(filters) / columns))
    figure = _figure(width, height)
    for k, image in enumerate(filters):
        axis = figure.add_subplot(rows, columns, k + 1)
        axis.imshow(image, interpolation="nearest")
        axis.set_axis_off()
    figure.suptitle("stem (patch embedding) filters")
    return _save(figure, path)


# --- Training -------------------------------------------------------------------


def plot_curves(log_csv, path, width=1000, height=400):
    """Loss and accuracy per epoch from a work directory's `log.csv`."""
    with open(log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{log_csv} holds no epochs yet.")
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure = _figure(width, height)
    for position, metric in ((1, "loss"), (2, "accuracy")):
        axis = figure.add_subplot(1, 2, position)
        for key in (metric, f"val_{metric}"):
            if key in rows[0] and rows[0][key] != "":
                axis.plot(epochs, [float(r[key]) for r in rows], label=key)
        axis.set_xlabel("epoch")
        axis.legend()
    return _save(figure, path)


def plot_confusion(matrix, path, class_names=None, width=600, height=600):
    """A confusion matrix (`evaluation.confusion_matrix`) as an image, true classes down."""
    matrix = np.asarray(matrix)
    figure = _figure(width, height)
    axis = figure.add_subplot(1, 1, 1)
    axis.imshow(matrix, cmap="Blues")
    names = class_names or [str(i) for i in range(len(matrix))]
    if len(names) <= 20:
        axis.set_xticks(range(len(names)), names, rotation=90)
        axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return _save(figure, path)
