"""Each adaptive method under a key of its own, so method overlays compose by layering.

A list setting such as ``trainer.callbacks`` is replaced, not merged, when a later config gives it
again: two overlays that each listed their callback there could not be layered. Under
``methods.<key>`` each method is one optional setting, so

    adaptalign fit --config configs/quickstart.yaml \\
        --config configs/methods/mmts_infonce.yaml --config configs/methods/arl.yaml

runs MM-TS and ARL together, and a variant overlay changes one value (``methods.arl.gamma: 2``)
without repeating the rest. An overlay may leave out ``class_path`` when it means the key's own
class. ``methods.<key>: null`` turns a method off again.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from jsonargparse import ArgumentParser, Namespace

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.curriculum import ObjectCurriculum
from adaptalign.callbacks.loss_weighting import LossWeighting
from adaptalign.callbacks.temperature_schedule import TemperatureSchedule

# In the order their callbacks run (the order the combined configuration always had).
METHODS: Mapping[str, type[L.Callback]] = {
    "mmts": TemperatureSchedule,  # MM-TS and the uni-modal cosine schedule (a subclass)
    "loss_weighting": LossWeighting,
    "tonics": ObjectCurriculum,
    "arl": ARL,
}


def add_method_arguments(parser: ArgumentParser) -> None:
    """``methods.<key>``: any subclass of the key's class; off (``null``) unless set."""
    for key, base in METHODS.items():
        parser.add_subclass_arguments(
            base, f"methods.{key}", required=False, fail_untyped=False, instantiate=True
        )


def method_callbacks(settings: Namespace) -> list[L.Callback]:
    """The instantiated methods of one command's settings, in :data:`METHODS` order."""
    methods = settings.get("methods") or {}
    return [methods[key] for key in METHODS if methods.get(key) is not None]
