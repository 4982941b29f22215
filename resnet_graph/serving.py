"""A trained run used on new images: ``predict`` and ``export`` (a TensorFlow SavedModel).

Both rebuild the run's network from its ``config.json`` in inference mode and
restore its latest (or best-validation) checkpoint, as ``eval`` does.

Image files are decoded by Pillow, turned as their EXIF orientation says (phone
photographs), converted to 8-bit RGB (16-bit grey scaled, not clipped; transparent
pixels over white, as a web page shows them) and resized to 32x32 as a
whole (the aspect ratio is not kept; crop first if that matters): with a box
filter (the average of the source pixels each target pixel covers) when
shrinking, which is how a small thumbnail such as a CIFAR-10 image relates to
a large photograph, and bicubic interpolation when enlarging.
"""

import dataclasses
import pathlib
from typing import Sequence

import numpy as np
import tensorflow as tf

from . import fsutil
from .data import CLASS_NAMES
from .errors import UserError, first_line
from .evaluate import open_run

tf1 = tf.compat.v1

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIZE = 32


@dataclasses.dataclass
class Prediction:
    source: str           # file name, or "file.npy[i]"
    probabilities: np.ndarray

    def top(self, k: int) -> list:
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(CLASS_NAMES[i], float(self.probabilities[i])) for i in order]

    def to_json(self, k: int) -> dict:
        return {"source": self.source, "top": [{"class": c, "probability": p}
                                               for c, p in self.top(k)]}


def _as_rgb(img):
    """A Pillow image as 8-bit RGB (see the module docstring)."""
    from PIL import Image
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):   # 16-bit grey PNGs
        grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def load_image(path) -> np.ndarray:
    """One PNG or JPEG file as uint8 [32, 32, 3] RGB (see the module docstring)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = pathlib.Path(path)
    try:
        with Image.open(path) as img:
            img = _as_rgb(ImageOps.exif_transpose(img))
            shrinking = img.width >= SIZE and img.height >= SIZE
            method = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
            return np.asarray(img.resize((SIZE, SIZE), method), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path} is not a readable PNG or JPEG image ({first_line(e)})") from None


def load_array(path) -> np.ndarray:
    """A .npy batch: uint8 [N, 32, 32, 3] or [32, 32, 3] RGB, or floats in 0..255 (rounded)."""
    path = pathlib.Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy array ({first_line(e)})") from None
    if not isinstance(array, np.ndarray):     # an .npz archive under a .npy name
        raise UserError(f"{path} is an .npz archive, not one .npy array; save the images "
                        "with numpy.save")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (SIZE, SIZE, 3):
        raise UserError(f"{path} holds an array of shape {array.shape}; expected [N, 32, 32, 3] "
                        "RGB pixels")
    if len(array) == 0:
        raise UserError(f"{path} holds no images; give at least one")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all() \
            or array.min() < 0 or array.max() > 255:
        raise UserError(f"{path}: pixels must be uint8, or numbers in 0..255")
    return np.rint(array).astype(np.uint8)


def load_inputs(paths: Sequence) -> tuple:
    """(uint8 [N, 32, 32, 3] images, one source label per image) from files."""
    images, sources = [], []
    for p in paths:
        p = pathlib.Path(p)
        if p.suffix.lower() == ".npy":
            batch = load_array(p)
            images.append(batch)
            sources.extend(f"{p}[{i}]" for i in range(len(batch)))
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(load_image(p)[None])
            sources.append(str(p))
        else:
            raise UserError(f"{p}: give PNG or JPEG files, or a .npy batch")
    if not images:
        raise UserError("no images given")
    return np.concatenate(images), sources


def predict(run_dir, paths: Sequence, *, best: bool = False, batch_size: int = 500,
            precision: str = "auto") -> list:
    """Class probabilities of every image in ``paths`` under the run's model
    (in ``precision``; ``auto``: the run's, see :func:`evaluate.open_run`)."""
    images, sources = load_inputs(paths)
    with open_run(run_dir, best=best, precision=precision) as (sess, tensors, _):
        probs = [sess.run(tensors.probabilities, {tensors.images: images[i:i + batch_size]})
                 for i in range(0, len(images), batch_size)]
    return [Prediction(s, p) for s, p in zip(sources, np.concatenate(probs))]


def export(run_dir, out, *, best: bool = False) -> pathlib.Path:
    """Write the run's model as a SavedModel in ``out`` (a new folder).

    Signatures: ``serving_default`` takes ``images``, uint8 [N, 32, 32, 3] RGB;
    ``serving_float`` takes ``images``, float32 pixels in 0..255 (rounded to
    the uint8 grid the model was trained on). Both return ``logits``,
    ``probabilities`` (float32 [N, 10]) and ``classes`` (int32 [N]). The graph
    is float32, whatever precision the run trained in.
    """
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new --out")

    def float_front_end():
        pixels = tf1.placeholder(tf.float32, [None, SIZE, SIZE, 3], name="float_images")
        as_uint8 = tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 255.0)), tf.uint8)
        return pixels, as_uint8

    # NHWC whatever this machine would pick: a SavedModel exported on a GPU host must
    # also run where convolutions have no NCHW kernel (TensorFlow's stock CPU build).
    with open_run(run_dir, best=best, precision="fp32", images_from=float_front_end,
                  data_format="NHWC") as (sess, tensors, front):
        outputs = {"logits": tensors.logits, "probabilities": tensors.probabilities,
                   "classes": tensors.predictions}
        sig = tf1.saved_model.signature_def_utils.predict_signature_def
        try:
            # Written beside --out and renamed into place when complete: a failure or a
            # kill never leaves a half-written SavedModel where a server would load it.
            out.parent.mkdir(parents=True, exist_ok=True)
            with fsutil.replacing_folder(out) as tmp:
                builder = tf1.saved_model.Builder(str(tmp))
                builder.add_meta_graph_and_variables(
                    sess, [tf1.saved_model.tag_constants.SERVING],
                    signature_def_map={"serving_default": sig({"images": tensors.images},
                                                              outputs),
                                       "serving_float": sig({"images": front}, outputs)},
                    strip_default_attrs=True)
                builder.save()
        except (OSError, tf.errors.OpError) as e:
            raise UserError(f"could not write the SavedModel to {out} ({first_line(e)}); "
                            "nothing was written there: free space or choose another --out"
                            ) from None
    return out
