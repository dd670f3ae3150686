"""Reading BatchNormalization layers out of Keras 3 files without Keras (h5py only).

:func:`load_keras_layers` reads a ``.keras`` archive (``config.json`` + ``model.weights.h5``)
or a bare ``.weights.h5`` file and returns every BatchNormalization layer in it as a
:class:`bn_cy.BatchNormalization` with its config and weights. h5py comes with the
``keras-io`` extra (``pip install 'bn_cy[keras-io]'``).

Keras 3 stores a layer's variables under ``<container path>/layers/<snake_case class
name>[_k]/vars/<i>``, where ``_k`` numbers the layers of one class inside one container in
order; the config's layer lists give that order, and so each config its weights.
"""

import io
import json
import re
import zipfile
from collections import OrderedDict

import numpy as np

__all__ = ["load_keras_layers"]

_BN_CLASSES = ("BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2",
               "SyncBatchNormalization")


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("reading Keras files needs h5py: pip install 'bn_cy[keras-io]'") \
            from exc
    return h5py


def _snake_case(name):
    # keras.src.utils.naming.to_snake_case
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()
    return name


def _unique(name, used):
    if name in used:
        used[name] += 1
        return "%s_%d" % (name, used[name])
    used[name] = 0
    return name


def _read_vars(h5, path):
    group = h5.get(path + "/vars") if path else h5.get("vars")
    if group is None:
        return None
    keys = sorted(group.keys(), key=int)
    return [np.array(group[k]) for k in keys]


def _layer_from(cfg, arrays, where, custom_objects):
    from .layer import BatchNormalization

    layer = BatchNormalization.from_config(cfg, custom_objects)
    if arrays is None:
        raise ValueError("no weights found for BatchNormalization layer at %r" % where)
    if not layer.built:  # no build_config: the smallest rank the axis allows
        layer.build(_guess_shape(layer.axis, arrays[-1].shape[0]))
    layer.set_weights(arrays)
    return layer


def _guess_shape(axis, channels):
    rank = axis + 1 if axis >= 0 else -axis
    rank = max(rank, 2)
    shape = [None] * rank
    shape[axis] = channels
    return shape


def _walk(config, h5, path, prefix, out, custom_objects):
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list):
        return
    used = {}
    for entry in layers:
        cls = entry.get("class_name")
        uname = _unique(_snake_case(cls or "layer"), used)
        sub = (path + "/" if path else "") + "layers/" + uname
        name = entry.get("config", {}).get("name", uname)
        key = prefix + name
        if cls in _BN_CLASSES:
            out[key] = _layer_from(entry, _read_vars(h5, sub), sub, custom_objects)
        elif isinstance(entry.get("config", {}).get("layers"), list):
            _walk(entry, h5, sub, key + "/", out, custom_objects)


def _from_weights_only(h5):
    from .layer import BatchNormalization

    out = OrderedDict()
    found = []
    h5.visit(lambda name: found.append(name)
             if re.search(r"(^|/)batch_normalization(_\d+)?$", name) else None)
    for path in found:
        arrays = _read_vars(h5, path)
        if arrays is None:
            continue
        n = len(arrays)
        if n == 4:
            kw = {}
        elif n == 2:
            kw = dict(center=False, scale=False)
        elif n == 7:
            kw = dict(renorm=True)
        else:
            raise ValueError(
                "%s has %d variables: a .weights.h5 file alone does not say whether gamma or "
                "beta is missing; read the .keras archive instead" % (path, n))
        layer = BatchNormalization(name=path.rsplit("/", 1)[-1], **kw)
        layer.build([None, arrays[-1].shape[0]])
        layer.set_weights(arrays)
        out[path] = layer
    return out


def load_keras_layers(path, custom_objects=None):
    """Every BatchNormalization layer of a Keras 3 ``.keras`` archive or ``.weights.h5`` file.

    Returns an ordered dict. From a ``.keras`` archive: keys are layer names (nested models
    give ``"outer/inner"``), values layers built from their configs (``build_config``) with
    their weights. From a bare ``.weights.h5`` file there is no config: keys are the HDF5
    paths of groups named ``batch_normalization[_k]``, and layers get Keras's default
    arguments (axis -1, epsilon 1e-3, momentum 0.99), with center/scale/renorm read off the
    number of variables (4, 2 or 7; 3 is ambiguous and raises ValueError).
    Needs only h5py, not Keras.
    """
    h5py = _h5py()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            names = archive.namelist()
            if "model.weights.h5" not in names:
                raise ValueError("%r has no model.weights.h5" % (path,))
            data = archive.read("model.weights.h5")
        out = OrderedDict()
        with h5py.File(io.BytesIO(data), "r") as h5:
            if config.get("class_name") in _BN_CLASSES:
                out[config.get("config", {}).get("name", "batch_normalization")] = _layer_from(
                    config, _read_vars(h5, ""), "", custom_objects)
            else:
                _walk(config, h5, "", "", out, custom_objects)
        return out
    with h5py.File(path, "r") as h5:
        return _from_weights_only(h5)
