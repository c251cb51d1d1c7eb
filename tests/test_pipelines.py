"""Saved runs are ordinary Hugging Face models: each task's run works through the matching ``transformers.pipeline``
in a fresh process (causal LM with its own BOS/EOS ids, masked LM, and an image folder's own classes), and vanilla
runs export to the stock architecture that loads where quantizable is not installed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantizable.models import FAMILIES
from quantizable.training import load_config, train

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
CLASSES = [f"class_{index:02d}" for index in range(12)]  # more than Fashion-MNIST's 10


pytestmark = pytest.mark.usefixtures("default_data")  # conftest: the embedded corpus, prepared once


def _image_folder(root: Path, classes: list[str]) -> Path:
    """``root/{train,val}/<class>/*.png``: 28x28 grey images whose brightness encodes the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for number in range(count):
                pixels = np.clip(rng.normal(20 * index, 10, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / name / f"{number}.png")
    return root


PIPELINES = r"""
import json, sys
import numpy as np
from PIL import Image
from quantizable import load_model  # registers our model types with transformers' Auto classes
from transformers import AutoTokenizer, pipeline

clm, mlm, image, picture = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(clm)
generator = pipeline("text-generation", model=clm)
generated = generator("The house", max_new_tokens=4, do_sample=False)[0]["generated_text"]
fill = pipeline("fill-mask", model=mlm)("The [MASK] is red.")
classify = pipeline("image-classification", model=image)(Image.open(picture), top_k=3)
print(json.dumps({
    "bos_first": tokenizer("The house")["input_ids"][0] == tokenizer.bos_token_id,
    "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    "generation_ids": [generator.model.generation_config.bos_token_id, generator.model.generation_config.eos_token_id,
                       generator.model.generation_config.pad_token_id],
    "generated": generated, "fill": [entry["token_str"] for entry in fill],
    "labels": [entry["label"] for entry in classify],
    "pixels": image and np.asarray(pipeline("image-classification", model=image).image_processor(
        Image.open(picture))["pixel_values"][0]).tolist(),
}))
"""


@pytest.mark.slow
def test_saved_runs_work_with_transformers_pipelines(tmp_path: Path) -> None:
    from quantizable.data import image_dataset
    from quantizable.models import load_model

    common = ["run.steps=2", "run.eval_batches=1", "run.log_every=1"]
    train(load_config("opt-tiny", common), tmp_path / "clm", progress=False)
    train(load_config("bert-tiny", common), tmp_path / "mlm", progress=False)
    folder = _image_folder(tmp_path / "images", CLASSES)
    train(load_config("vit-tiny", [*common, "run.batch_size=4", f"data.source={folder}"]), tmp_path / "image",
          progress=False)

    # the image run has the folder's 12 classes, by name (was: a fixed 10-class head, IndexError on label 11)
    config = load_model(tmp_path / "image").config
    assert config.num_labels == 12 and [config.id2label[i] for i in range(12)] == CLASSES
    assert (tmp_path / "image" / "model" / "preprocessor_config.json").is_file()
    # the causal LM's config says the tokenizer's ids (was: bos = eos = pad = 2, the <pad> token)
    clm_config = json.loads((tmp_path / "clm" / "model" / "config.json").read_text())
    assert [clm_config["bos_token_id"], clm_config["eos_token_id"], clm_config["pad_token_id"]] == [0, 1, 2]

    # analyze counts images as images (was: "32 sequences")
    from quantizable.cli.main import main as cli_main

    assert cli_main(["analyze", str(tmp_path / "image"), "--batches", "1", "--batch-size", "4",
                     "--out", str(tmp_path / "analysis")]) == 0
    assert "4 images." in (tmp_path / "analysis" / "report.md").read_text()

    picture = folder / "val" / CLASSES[5] / "0.png"
    result = subprocess.run([PYTHON, "-c", PIPELINES, *(str(tmp_path / name / "model") for name in
                                                        ("clm", "mlm", "image")), str(picture)],
                            env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["bos_first"] and seen["ids"] == [0, 1, 2] and seen["generation_ids"] == [0, 1, 2]
    assert seen["generated"].startswith("The house") and len(seen["fill"]) == 5
    assert len(seen["labels"]) == 3 and set(seen["labels"]) <= set(CLASSES)
    # the image processor prepares an image exactly as training did
    ours = image_dataset("validation", str(folder))
    index = [i for i in range(len(ours)) if ours.labels[i] == 5][0]
    assert np.allclose(np.asarray(seen["pixels"]), ours[index]["pixel_values"].numpy(), atol=1e-5)


WITHOUT_QUANTIZABLE = r"""
import importlib.abc, json, sys
import torch
from PIL import Image

class NoQuantizable(importlib.abc.MetaPathFinder):  # as on a machine where our package is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "quantizable":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoQuantizable())
try:
    import quantizable
    blocked = False
except ModuleNotFoundError:
    blocked = True
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, pipeline

clm, mlm, image, clm_run, mlm_run, gated, image_run, picture = sys.argv[1:9]
generated = pipeline("text-generation", model=clm)("The house", max_new_tokens=4, do_sample=False)
fill = pipeline("fill-mask", model=mlm)("The [MASK] is red.")
vit = AutoModelForImageClassification.from_pretrained(image).eval()
# our own classes, from the code saved beside the weights
remote_generated = pipeline("text-generation", model=clm_run, trust_remote_code=True)("The house", max_new_tokens=4,
                                                                                      do_sample=False)
remote_fill = pipeline("fill-mask", model=mlm_run, trust_remote_code=True)("The [MASK] is red.")
remote_gated = AutoModelForCausalLM.from_pretrained(gated, trust_remote_code=True).eval()
remote_labels = [entry["label"] for entry in pipeline("image-classification", model=image_run,
                                                        trust_remote_code=True)(Image.open(picture), top_k=2)]
with torch.no_grad():
    logits = vit(pixel_values=torch.ones(1, 1, 28, 28)).logits
    gated_logits = remote_gated(input_ids=torch.arange(8)[None]).logits
print(json.dumps({"blocked": blocked, "generated": generated[0]["generated_text"], "fill": len(fill),
                  "types": [vit.config.model_type], "labels": vit.config.id2label[0], "logits": logits[0].tolist(),
                  "remote": [remote_generated[0]["generated_text"] == generated[0]["generated_text"],
                             [e["token_str"] for e in remote_fill] == [e["token_str"] for e in fill],
                             type(remote_gated).__name__, remote_labels],
                  "gated_logits": gated_logits[0].tolist()}))
"""


@pytest.mark.slow
def test_runs_load_where_quantizable_is_not_installed(tmp_path: Path, capsys) -> None:
    """Where quantizable cannot be imported: ``export --stock`` output loads with plain transformers, and every run
    (modified ones too) with ``trust_remote_code=True`` from the code saved beside its weights; both compute what
    our classes compute."""
    from quantizable.cli.main import main as cli_main
    from quantizable.models import load_model

    common = ["run.steps=2", "run.eval_batches=1"]
    folder = _image_folder(tmp_path / "images", CLASSES[:3])
    for name, preset, extra in (("clm", "opt-tiny", []), ("mlm", "bert-tiny", []),
                                ("image", "vit-tiny", ["run.batch_size=4", f"data.source={folder}"])):
        train(load_config(preset, [*common, *extra]), tmp_path / name, progress=False)
        capsys.readouterr()
        assert cli_main(["export", str(tmp_path / name), "--stock", "--out", str(tmp_path / f"{name}-stock")]) == 0
        assert "Writing model shards" not in capsys.readouterr().err  # transformers' per-file bars are off
    from quantizable import AttentionSpec, create_model

    gated = create_model("opt-tiny", AttentionSpec(kind="gated_attention")).eval()
    gated.save_pretrained(tmp_path / "gated")  # the Python API's save carries the code too (issue 31, item 5)
    result = subprocess.run([PYTHON, "-c", WITHOUT_QUANTIZABLE,
                             *(str(tmp_path / f"{name}-stock") for name in ("clm", "mlm", "image")),
                             str(tmp_path / "clm" / "model"), str(tmp_path / "mlm" / "model"), str(tmp_path / "gated"),
                             str(tmp_path / "image" / "model"), str(folder / "val" / CLASSES[1] / "0.png")],
                            env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel" not in result.stderr  # the remote-code copy has no C source: ATen without a warning
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["blocked"] and seen["generated"].startswith("The house") and seen["fill"] == 5
    assert seen["types"] == ["vit"] and seen["labels"] == CLASSES[0]
    with torch.no_grad():
        ours = load_model(tmp_path / "image").eval()(pixel_values=torch.ones(1, 1, 28, 28)).logits[0]
    assert np.allclose(seen["logits"], ours.numpy(), atol=1e-5)
    # trust_remote_code: the same generations and fills from our classes, and a gated model computes its gates
    assert seen["remote"][:3] == [True, True, "QuantizableOPTForCausalLM"]
    assert len(seen["remote"][3]) == 2 and set(seen["remote"][3]) <= set(CLASSES[:3])  # the grey processor, too
    with torch.no_grad():
        gated_logits = gated(input_ids=torch.arange(8)[None]).logits[0]
    assert np.allclose(seen["gated_logits"], gated_logits.numpy(), atol=1e-5)

    # a modified model has no stock architecture, and switching its attention implementation would drop the gates
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "gated"), "--stock", "--out", str(tmp_path / "gated-stock")]) == 2
    assert "only vanilla models export with --stock" in capsys.readouterr().err
    assert not (tmp_path / "gated-stock").exists()
    for implementation in ("sdpa", "eager"):
        with pytest.raises(ValueError, match="would silently drop this model's gated attention"):
            gated.set_attn_implementation(implementation)
    assert gated.config._attn_implementation == "quantizable"


IMPORT_THEN_AUTO = r"""
import sys
import quantizable
loaded = sorted(name for name in ("torch", "transformers") if name in sys.modules)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(loaded, type(model).__name__, model.config.attention_spec["kind"])
"""


@pytest.mark.slow
def test_import_quantizable_registers_the_classes_when_transformers_loads(tmp_path: Path) -> None:
    """``import quantizable`` then ``AutoModelForCausalLM.from_pretrained`` resolves our model type without remote
    code (issue 31, item 5), and the import itself still loads neither torch nor transformers."""
    from quantizable import AttentionSpec, create_model

    create_model("opt-tiny", AttentionSpec(kind="gated_attention")).save_pretrained(tmp_path / "gated")
    config_file = tmp_path / "gated" / "config.json"
    config = json.loads(config_file.read_text())
    assert set(config.pop("auto_map")) == {"AutoConfig", "AutoModelForCausalLM", "AutoModel"}  # by save_pretrained
    config_file.write_text(json.dumps(config))  # so only our registration can resolve quantizable_opt
    done = subprocess.run([PYTHON, "-c", IMPORT_THEN_AUTO, str(tmp_path / "gated")], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[] QuantizableOPTForCausalLM gated_attention"


FEATURES = r"""
import importlib.abc, json, sys

class NoQuantizable(importlib.abc.MetaPathFinder):  # as on a machine where our package is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "quantizable":
            raise ModuleNotFoundError(f"No module named {name!r}")

if sys.argv[1] == "without":
    sys.meta_path.insert(0, NoQuantizable())
else:
    import quantizable
from transformers import pipeline
extract = pipeline("feature-extraction", model=sys.argv[2], trust_remote_code=sys.argv[1] == "without")
print(json.dumps({"model": type(extract.model).__name__, "features": extract("the house is small")[0]}))
"""


@pytest.mark.slow
def test_a_gated_model_gives_embeddings_through_the_feature_extraction_pipeline(tmp_path: Path) -> None:
    """``AutoModel`` / ``pipeline("feature-extraction")`` of a gated BERT, with quantizable importable and without
    (remote code): the headless model with its gates, the same hidden states as ours (issue 31, item 2)."""
    from transformers import AutoTokenizer

    from quantizable.models import load_model

    train(load_config("bert-tiny", ["run.steps=2", "run.eval_batches=1",
                                    "attention={kind: gated_attention, gate_type: linear, pi_init: 0.25}"]),
          tmp_path / "gated", progress=False)
    model_dir = tmp_path / "gated" / "model"
    inputs = AutoTokenizer.from_pretrained(model_dir)("the house is small", return_tensors="pt")
    with torch.no_grad():
        ours = load_model(model_dir).bert(**inputs).last_hidden_state[0].numpy()
    for where in ("with", "without"):
        done = subprocess.run([PYTHON, "-c", FEATURES, where, str(model_dir)], env=ENV, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["model"] == "QuantizableBertModel", where
        assert np.allclose(np.asarray(seen["features"]), ours, atol=1e-5), where


def test_image_folder_classes_follow_the_data(tmp_path: Path) -> None:
    """Two classes give a two-output head; validation labels index the training classes even when one is absent."""
    from quantizable.data import image_dataset, label_settings

    folder = _image_folder(tmp_path / "images", ["cat", "dog"])
    (folder / "val" / "cat" / "0.png").unlink()
    (folder / "val" / "cat").rmdir()
    assert list(image_dataset("validation", str(folder)).labels) == [1]  # dog stays label 1
    assert label_settings(["cat", "dog"], {})["num_labels"] == 2
    with pytest.raises(ValueError, match="num_labels=10 but the image data has 2 classes"):
        label_settings(["cat", "dog"], {"num_labels": 10})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_automodel_of_a_saved_task_model_is_its_base_model(tmp_path: Path, family: str) -> None:
    """``AutoModel.from_pretrained`` of a saved task model (``pipeline("feature-extraction")``'s load) gives that
    model's base model weight for weight, with no missing tensor (was: a ViT's encoder layers came up at random,
    their saved names not mapped to its modules; BERT's and ViT's pooler at random), and the task class loads a
    saved headless model back."""
    from transformers import AutoModel

    from quantizable.models import create_model

    model = create_model(f"{family}-tiny").eval()
    model.save_pretrained(tmp_path / "task")
    base, info = AutoModel.from_pretrained(tmp_path / "task", output_loading_info=True)
    prefix = f"{model.base_model_prefix}."
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not [key for key in info["unexpected_keys"] if key.startswith(prefix)]  # only the head is left out
    saved = model.base_model.state_dict()
    loaded = base.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)
    inputs = ({"pixel_values": torch.randn(2, 1, 28, 28)} if model.main_input_name == "pixel_values"
              else {"input_ids": torch.randint(0, model.config.vocab_size, (2, 8))})
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, model.base_model(**inputs).last_hidden_state)

    base.save_pretrained(tmp_path / "base")
    task, info = type(model).from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not [key for key in info["missing_keys"] if key.startswith(prefix)]
    reloaded = task.base_model.state_dict()
    assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[key], saved[key]) for key in saved)
