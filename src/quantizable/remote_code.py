"""Self-contained modeling code beside a saved model, so that ``AutoModelFor*.from_pretrained(dir,
trust_remote_code=True)`` rebuilds our classes where ``quantizable`` is not installed (the Hugging Face convention
for custom architectures: ``auto_map`` in ``config.json`` names a class in a ``.py`` file of the directory).

The files are our own modules that the model classes import, copied flat (``quantizable/attention/spec.py`` ->
``quantizable_attention_spec.py``) with their ``quantizable`` imports made relative (transformers copies them with
the entry file), and the grey image processor of image runs. Without the C kernel source beside them, attention
uses the ATen ops (the same numbers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
ENTRY = "models.modeling"  # defines the Quantizable<Config> / Quantizable<Model> classes
IMPORT = re.compile(r"^(\s*)from quantizable\.([\w.]+) import", re.MULTILINE)


def _flat_name(module: str) -> str:
    return "quantizable_" + module.replace(".", "_")


def _source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def module_closure(entry: str = ENTRY) -> list[str]:
    """``entry`` and every ``quantizable`` module it imports, directly or not (at any indentation)."""
    found, pending = [], [entry]
    while pending:
        module = pending.pop()
        if module in found:
            continue
        found.append(module)
        pending += [match.group(2) for match in IMPORT.finditer(_source(module).read_text())]
    return sorted(found)


def write_remote_code(directory: str | Path, model: Any) -> list[str]:
    """Copy the modeling code into ``directory`` (a ``save_pretrained`` output) and point ``config.json``'s
    ``auto_map`` at the model's classes; returns the files written."""
    directory = Path(directory)
    written = []
    for module in module_closure():
        text = IMPORT.sub(lambda m: f"{m.group(1)}from .{_flat_name(m.group(2))} import", _source(module).read_text())
        (directory / f"{_flat_name(module)}.py").write_text(text)
        written.append(f"{_flat_name(module)}.py")
    from quantizable.models import QUANTIZABLE_CLASSES, family_of_config

    entry, classes = _flat_name(ENTRY), QUANTIZABLE_CLASSES[family_of_config(model.config).name]
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": f"{entry}.{classes.config_class.__name__}",
                          classes.auto_class.__name__: f"{entry}.{classes.model_class.__name__}",
                          "AutoModel": f"{entry}.{classes.base_model_class.__name__}"}  # the headless model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def write_remote_image_processor(directory: str | Path) -> None:
    """The same for our image processor saved in ``directory``: its module imports nothing of this package, so it
    is copied as it is, and the model config's ``auto_map`` points at it. (Not ``preprocessor_config.json``'s: the
    pipelines then also look for a video processor there and ask whether to run remote code.)"""
    directory, module = Path(directory), "data.image_processor"
    processor_file, config_file = directory / "preprocessor_config.json", directory / "config.json"
    processor = json.loads(processor_file.read_text())
    if processor.get("image_processor_type") != "GreyImageProcessor":
        return  # a stock processor: transformers has it
    (directory / f"{_flat_name(module)}.py").write_text(_source(module).read_text())
    # without a type name AutoImageProcessor asks the model config: its registered class (where quantizable is
    # imported) maps to the local processor, else its auto_map to the copied one
    del processor["image_processor_type"]
    processor_file.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    config = json.loads(config_file.read_text())
    config.setdefault("auto_map", {})["AutoImageProcessor"] = f"{_flat_name(module)}.GreyImageProcessor"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
