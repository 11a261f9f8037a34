r"""The caption grammar of the text-to-image digits teacher (`ddjax.demo.digits_t2i`).

Every digit image gets a short English caption naming its digit, e.g. "a handwritten seven",
"the thin digit zero", "a bold three". A caption is

    TEMPLATES[t].format(style=STYLES[s], digit=DIGIT_NAMES[d])   (an empty style word drops out)

* the digit d is the image's label (zero .. nine);
* the style s is the image's ink-mass tercile within its class: ink mass = the sum over pixels
  of (grey + 1) / 2 (grey in [-1, 1]); the 1/3 and 2/3 quantiles of the ink masses of all 1797
  digits of that class (at the same image size) split "thin" (lightest third), "" (no style
  word) and "bold" (heaviest third). It is a property of the image, so the teacher can learn it;
* the template t is drawn uniformly per image from a `numpy` generator seeded with `seed`
  (deterministic given the seed; the trainer draws one per shifted copy of the training set).

There are len(TEMPLATES) * len(STYLES) * 10 = 120 distinct captions (`all_captions()`), ids
digit-major: id = (d * len(STYLES) + s) * len(TEMPLATES) + t. Every caption ends with the digit
name, at most 4 words; the vocabulary (`VOCAB`) has 17 words.
"""

from __future__ import annotations

import functools

import numpy as np

from ddjax.evaluate.digits import digits_images

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("thin", "", "bold")  # ink-mass terciles within the class: light, middle, heavy
TEMPLATES = ("a {style} handwritten {digit}", "the {style} digit {digit}", "a {style} {digit}",
             "a {style} number {digit}")
VOCAB = ("a", "the", "handwritten", "digit", "number", "thin", "bold", *DIGIT_NAMES)


def caption_text(digit: int, style: int, template: int) -> str:
    """The caption of (digit 0..9, style index into STYLES, template index into TEMPLATES)."""
    text = TEMPLATES[template].format(style=STYLES[style], digit=DIGIT_NAMES[digit])
    return " ".join(text.split())  # an empty style word leaves no double space


def caption_id(digit: np.ndarray, style: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Ids into `all_captions()` (digit-major)."""
    return ((np.asarray(digit) * len(STYLES) + np.asarray(style)) * len(TEMPLATES)
            + np.asarray(template)).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _all() -> tuple[tuple[str, ...], tuple[int, ...]]:
    texts, classes = [], []
    for d in range(len(DIGIT_NAMES)):
        for s in range(len(STYLES)):
            for t in range(len(TEMPLATES)):
                texts.append(caption_text(d, s, t))
                classes.append(d)
    return tuple(texts), tuple(classes)


def all_captions() -> tuple[list[str], np.ndarray]:
    """(texts, classes): the DISTINCT captions (id order) and the digit each one names."""
    texts, classes = _all()
    return list(texts), np.asarray(classes, np.int32)


def num_captions() -> int:
    return len(_all()[0])


def caption_ids_of_digit(digit: int) -> np.ndarray:
    """The ids of the captions naming `digit`."""
    return np.flatnonzero(np.asarray(_all()[1]) == digit).astype(np.int32)


def ink_mass(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] (or [N, H, W]) in [-1, 1] -> [N] sum of (grey + 1) / 2."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    return ((x + 1.0) / 2.0).reshape(len(x), -1).sum(axis=1)


@functools.lru_cache(maxsize=4)
def style_thresholds(image_size: int = 32) -> np.ndarray:
    """[10, 2]: the 1/3 and 2/3 quantiles of the ink mass of all 1797 digits of each class."""
    images, labels = digits_images(image_size)
    mass = ink_mass(images)
    return np.stack([np.quantile(mass[labels == d], [1 / 3, 2 / 3]) for d in range(10)])


def style_ids(images: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """[N] style index (0 thin, 1 plain, 2 bold): the ink-mass tercile of each image within the
    class `digits` names (thresholds of `style_thresholds` at the images' size)."""
    thr = style_thresholds(int(np.asarray(images).shape[1]))[np.asarray(digits)]
    mass = ink_mass(images)
    return ((mass > thr[:, 0]).astype(np.int32) + (mass > thr[:, 1]).astype(np.int32))


def image_captions(images: np.ndarray, labels: np.ndarray, seed: int = 0
                   ) -> tuple[np.ndarray, list[str]]:
    """(caption ids [N] into `all_captions()`, texts [N]) of the training images: the label's
    digit, the image's style and a template drawn with `seed`."""
    labels = np.asarray(labels, np.int32)
    template = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(labels))
    ids = caption_id(labels, style_ids(images, labels), template)
    texts = _all()[0]
    return ids, [texts[i] for i in ids]
