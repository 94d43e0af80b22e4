"""The words of the Fashion-MNIST text-to-image data: what each class is called in a caption, the caption
templates, one prompt per class (what prompt adherence is measured on) and the class a caption names.
Shared by the training data (train/demo/fashion_captions.py) and the evaluation (eval/adherence.py)."""
from __future__ import annotations

import numpy as np

# What each Fashion-MNIST class is called in a caption (the data set's own names are "T-shirt/top", ...).
CLASS_PHRASES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
TEMPLATES = ("a photo of {a} {c}", "a black and white picture of {a} {c}", "{a} {c}", "a product photo of {a} {c}",
             "a grayscale image of {a} {c}", "a picture of {a} {c} on a black background", "a small photo of {a} {c}",
             "a low resolution photo of {a} {c}")


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def caption(label: int, index: int) -> str:
    phrase = CLASS_PHRASES[label]
    return TEMPLATES[index % len(TEMPLATES)].format(a=article(phrase), c=phrase)


def class_prompts() -> list[str]:
    """One prompt per class, in label order ("a photo of a t-shirt", ...): what prompt adherence is measured on."""
    return [TEMPLATES[0].format(a=article(p), c=p) for p in CLASS_PHRASES]


def labels_of(captions: list[str]) -> np.ndarray:
    """The class index each caption names (-1 when none), longest phrase first ("shirt" is in "t-shirt")."""
    order = sorted(range(len(CLASS_PHRASES)), key=lambda k: -len(CLASS_PHRASES[k]))
    found = [next((k for k in order if CLASS_PHRASES[k] in c), -1) for c in captions]
    return np.asarray(found, dtype=np.int64)
