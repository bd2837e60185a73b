"""exporters.models (resolving --model) and exporters.api.run_export (staging, verification outcome, report).

The verifier is replaced by a stand-in here where a test needs a chosen outcome; the real one runs in
tests/cli/test_cli.py's happy path."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import reformer
from exporters import api
from exporters.errors import ExportError
from exporters.models import (
    DEFAULT_MODEL,
    RANDOM_WEIGHTS_SEED,
    built_in_models,
    default_task,
    resolve_model,
)
from exporters.result import REPORTED_DISTRIBUTIONS, library_versions
from exporters.torchscript import load_metadata
from tiny_configs import BASE


def save_checkpoint(directory, model_class="ReformerModelWithLMHead", **overrides) -> str:
    torch.manual_seed(0)
    config = reformer.ReformerConfig(**{**BASE, "attn_layers": ["local", "lsh"], **overrides})
    reformer.MODEL_CLASSES[model_class](config).save_pretrained(directory)
    return str(directory)


# ----- resolving --model -----

def test_built_in_models_include_the_default_and_enwik8():
    assert {DEFAULT_MODEL, "enwik8"} <= set(built_in_models())


def test_default_model_is_the_shipped_trained_byte_lm():
    resolved = resolve_model(None)
    assert resolved.name == DEFAULT_MODEL == "byte-lm" and resolved.built_in
    assert resolved.random_weights_seed is None and resolved.spec.name == "causal-lm"
    shipped = reformer.ReformerModelWithLMHead.from_pretrained(resolved.directory).state_dict()
    for key, value in resolved.model.state_dict().items():
        assert torch.equal(value, shipped[key]), key


def test_config_only_built_in_model_gets_reproducible_random_weights():
    first, second = resolve_model("tiny"), resolve_model("tiny")
    assert first.built_in and first.random_weights_seed == RANDOM_WEIGHTS_SEED
    assert first.spec.name == "causal-lm" and not first.model.training
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert "random weights" in first.describe()


def test_checkpoint_directory_loads_its_weights(tmp_path):
    directory = save_checkpoint(tmp_path / "ckpt", "ReformerForQuestionAnswering")
    resolved = resolve_model(directory)
    assert resolved.spec.name == "question-answering" and resolved.name == "ckpt"
    assert not resolved.built_in and resolved.random_weights_seed is None
    saved = reformer.ReformerForQuestionAnswering.from_pretrained(directory).state_dict()
    for key, value in resolved.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_head_checkpoint_exports_as_base(tmp_path):
    resolved = resolve_model(save_checkpoint(tmp_path / "ckpt", is_decoder=True), task="base")
    assert type(resolved.model).__name__ == "ReformerModel"


@pytest.mark.parametrize("architectures,is_decoder,expected", [
    (["ReformerForMaskedLM"], False, "masked-lm"),
    (["ReformerForSequenceClassification"], False, "sequence-classification"),
    (["BertModel"], True, "causal-lm"),
    (None, True, "causal-lm"),
    (None, False, "base"),
])
def test_default_task(architectures, is_decoder, expected):
    config = reformer.ReformerConfig(**{**BASE, "is_decoder": is_decoder})
    if architectures:
        config.extra["architectures"] = architectures
    assert default_task(config) == expected


def test_unknown_task_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="unknown task 'summarization'"):
        resolve_model(DEFAULT_MODEL, task="summarization")


def test_causal_lm_needs_a_causal_config(tmp_path):
    directory = save_checkpoint(tmp_path / "ckpt", "ReformerForMaskedLM")
    with pytest.raises(reformer.ConfigError, match="needs a causal model"):
        resolve_model(directory, task="causal-lm")


def test_existing_directory_wins_over_a_built_in_name(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / DEFAULT_MODEL, "ReformerModel")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model(DEFAULT_MODEL)
    assert not resolved.built_in and resolved.spec.name == "base"


def test_built_in_model_with_weights_loads_them(tmp_path):
    save_checkpoint(tmp_path / "shipped", "ReformerForMaskedLM")
    resolved = resolve_model("shipped", models_dir=tmp_path)
    assert resolved.built_in and resolved.random_weights_seed is None and resolved.spec.name == "masked-lm"


def test_hub_id_resolves_through_the_huggingface_cache(tmp_path, hub_cache):
    snapshot = hub_cache("someone/my-reformer", save_checkpoint(tmp_path / "ckpt", "ReformerForMaskedLM"))
    resolved = resolve_model("someone/my-reformer")
    assert (resolved.name, resolved.hub_id, resolved.built_in) == ("my-reformer", "someone/my-reformer", False)
    assert resolved.spec.name == "masked-lm" and resolved.directory == str(snapshot)
    assert resolved.metadata()["model_source"] == f"Hugging Face Hub someone/my-reformer@{snapshot.name}"


def test_existing_directory_wins_over_a_hub_id(tmp_path, monkeypatch, hub_cache):
    hub_cache("someone/my-reformer", save_checkpoint(tmp_path / "ckpt", "ReformerForMaskedLM"))
    save_checkpoint(tmp_path / "someone" / "my-reformer", "ReformerModel")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("someone/my-reformer")
    assert resolved.hub_id is None and resolved.spec.name == "base"
    assert resolved.metadata()["model_source"] == "someone/my-reformer"


def test_name_neither_built_in_nor_a_hub_id_shows_both_forms():
    with pytest.raises(reformer.CheckpointError, match="no model directory reformer-enwik8 and no built-in model of "
                                                       r"that name \(built-in: .*enwik8.*; a Hugging Face Hub id is "
                                                       r"namespace/name\)"):
        resolve_model("reformer-enwik8")


# ----- run_export -----

class StandInReport:
    def __init__(self, passed: bool):
        self.passed = passed

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rows": []}

    def summary_table(self) -> str:
        return "runtime  max abs\nstand-in  0"


@pytest.fixture
def verifier(monkeypatch):
    """Replaces the verifier; returns the list of paths it was asked to verify and sets its outcome."""
    import exporters.verify

    calls = {"paths": [], "passed": True}

    def verify_export(model, spec, path, fmt, **options):
        assert os.path.isfile(path), "verification must see the exported file"
        calls["paths"].append(path)
        return StandInReport(calls["passed"])

    monkeypatch.setattr(exporters.verify, "verify_export", verify_export)
    return calls


def test_output_appears_only_after_verification(tmp_path, monkeypatch, verifier):
    monkeypatch.chdir(tmp_path)
    result = api.run_export(api.ExportRequest("torchscript", model="tiny", max_length=64, report="report.json"))
    assert result.passed and result.output == "tiny-causal-lm.pt"
    assert verifier["paths"] and not os.path.exists(verifier["paths"][0]), "verified in a staging folder"
    assert sorted(os.listdir(tmp_path)) == ["report.json", "tiny-causal-lm.pt"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["task"] == "causal-lm" and report["request"]["max_length"] == 64
    assert report["settings"]["max_length"] == 64
    metadata = load_metadata(str(tmp_path / "tiny-causal-lm.pt"))
    assert metadata["model_name"] == "tiny" and metadata["random_weights_seed"] == RANDOM_WEIGHTS_SEED
    assert metadata["max_length"] == 64


@pytest.mark.parametrize("keep_failed", [False, True])
def test_failed_verification_removes_the_output_unless_kept(keep_failed, tmp_path, verifier):
    verifier["passed"] = False
    output, report = tmp_path / "lm.pt", tmp_path / "report.json"
    result = api.run_export(api.ExportRequest("torchscript", output=str(output), keep_failed=keep_failed,
                                              report=str(report)))
    assert not result.passed
    assert output.exists() == keep_failed and (result.output is not None) == keep_failed
    assert json.loads(report.read_text())["passed"] is False
    assert "FAILED" in result.summary_table()
    assert sorted(os.listdir(tmp_path)) == sorted(["report.json"] + (["lm.pt"] if keep_failed else []))


def test_error_during_export_leaves_nothing(tmp_path, monkeypatch):
    import exporters.torchscript

    def broken_export(model, spec, path, **options):
        with open(path, "w") as handle:
            handle.write("half a file")
        raise ExportError("the exporter broke")

    monkeypatch.setattr(exporters.torchscript, "export_torchscript", broken_export)
    with pytest.raises(ExportError, match="the exporter broke"):
        api.run_export(api.ExportRequest("torchscript", output=str(tmp_path / "lm.pt")))
    assert os.listdir(tmp_path) == []


def test_no_verify_skips_the_verifier(tmp_path, verifier):
    result = api.run_export(api.ExportRequest("torchscript", output=str(tmp_path / "lm.pt"), verify=False))
    assert result.verification is None and result.passed and verifier["paths"] == []
    assert "skipped" in result.summary_table()


def test_existing_output_is_replaced_whole(tmp_path, verifier):
    output = tmp_path / "lm.pt"
    output.write_text("an older export")
    api.run_export(api.ExportRequest("torchscript", output=str(output)))
    assert torch.jit.load(str(output)) is not None


@pytest.mark.parametrize("request_values,message", [
    (dict(format="tflite"), "unknown format 'tflite'"),
    (dict(format="onnx", custom_ops="tensorrt"), "unknown custom ops 'tensorrt'"),
    (dict(format="onnx", atol=0.0), "atol must be positive"),
    (dict(format="onnx", dtype="fp16"), "use device cuda"),
    (dict(format="onnx", opset=17), "opset 17 is not supported: choose 18 to 23"),
    (dict(format="onnx", task=api.GENERATION_TASK, opset=24), "opset 24 is not supported"),
    (dict(format="torchscript", opset=18), "--opset applies to ONNX only"),
    (dict(format="torchscript", task=api.GENERATION_TASK, custom_ops="standard"), "--custom-ops applies to ONNX only"),
    (dict(format="onnx", verify=False, atol=0.1), "--atol applies to verification only"),
    (dict(format="torchscript", verify=False, keep_failed=True), "--keep-failed applies to verification only"),
    (dict(format="onnx", task=api.GENERATION_TASK, dtype="fp16", device="cuda"), "drop --dtype and --device"),
])
def test_bad_options_fail_before_any_work(request_values, message, tmp_path, monkeypatch):
    import exporters.models

    def no_loading(*arguments, **options):
        raise AssertionError("the model was loaded for a request that cannot be carried out")

    monkeypatch.setattr(exporters.models, "resolve_model", no_loading)
    with pytest.raises(ExportError, match=message):
        api.run_export(api.ExportRequest(**request_values, output=str(tmp_path / "x")))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("request_values,settings", [
    (dict(format="onnx"), dict(format="onnx", dtype="fp32", device="cpu", max_length=256, opset=18, custom_ops="auto")),
    (dict(format="onnx", opset=21, custom_ops="standard", max_length=40),
     dict(format="onnx", dtype="fp32", device="cpu", max_length=40, opset=21, custom_ops="standard")),
    (dict(format="torchscript", max_length=40), dict(format="torchscript", dtype="fp32", device="cpu", max_length=40)),
])
def test_applied_settings_resolve_defaults_and_hold_onnx_options_only_for_onnx(request_values, settings):
    config = resolve_model("tiny").model.config
    assert api.applied_settings(api.ExportRequest(**request_values), config) == settings


@pytest.mark.parametrize("overrides,noted", [
    (dict(hash_seed=None), True),
    (dict(hash_seed=0), False),
    (dict(hash_seed=None, attn_layers=["local", "local"]), False),  # no LSH layer: no rotations to draw
])
def test_a_defaulted_hash_seed_is_noted_only_where_it_matters(overrides, noted):
    config = reformer.ReformerConfig(**{**BASE, "attn_layers": ["local", "lsh"], **overrides})
    notes = api.export_notes(config)
    assert len(notes) == int(noted)
    if noted:
        assert "seed 0" in notes[0] and "set hash_seed in config.json" in notes[0]


@pytest.mark.parametrize("overrides,noted", [
    (dict(num_buckets=None), True),
    (dict(num_buckets=8), False),
    (dict(num_buckets=None, attn_layers=["local", "local"]), False),  # no LSH layer: no buckets to resolve
])
def test_an_unset_num_buckets_is_noted_with_the_value_resolved(overrides, noted):
    """transformers resolves an unset num_buckets from the first length a model runs, we from
    max_position_embeddings (32 here, chunks of 4: 16 buckets, factorised as 4 x 4): the note says which we
    took."""
    config = reformer.ReformerConfig(**{**BASE, "attn_layers": ["local", "lsh"], **overrides})
    notes = api.export_notes(config)
    assert len(notes) == int(noted)
    if noted:
        assert "num_buckets [4, 4]" in notes[0] and "max_position_embeddings 32" in notes[0]
        assert "first sequence length" in notes[0] and "set num_buckets to [4, 4] in config.json" in notes[0]


def test_library_versions_name_the_installed_libraries():
    versions = library_versions()
    assert set(versions) == {"python", *REPORTED_DISTRIBUTIONS}
    assert versions["torch"] == torch.__version__
    assert versions["onnxruntime"] or versions["onnxruntime-gpu"]


# ----- the full-size built-in model -----

def test_enwik8_shape_exports_with_random_weights(tmp_path):
    """The public enwik8 Reformer's shape (models/enwik8/config.json, about 149M parameters), at a reduced
    maximum length so that it exports in seconds: traced at 2 x 385 tokens, checked at 1 x 300."""
    resolved = resolve_model("enwik8")
    config = resolved.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
        1024, 12, 8, 258)
    assert resolved.random_weights_seed == RANDOM_WEIGHTS_SEED
    output = tmp_path / "enwik8.pt"
    start = time.perf_counter()
    result = api.run_export(api.ExportRequest("torchscript", model="enwik8", output=str(output), max_length=512,
                                              verify=False))
    assert result.output == str(output) and time.perf_counter() - start < 120
    input_ids = torch.randint(0, config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = resolved.model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = torch.jit.load(str(output))(input_ids, attention_mask)[0]
    # Bitwise: the traced graph calls eager's own ATen kernels on the same shapes in this process (torch aligns
    # every buffer to 64 bytes, so MKL takes the same paths), and rounds exactly as eager does.
    assert torch.equal(expected, actual), f"max abs diff {(expected - actual).abs().max().item():.3g}"


def test_missing_runtime_fails_before_loading_the_model(tmp_path, monkeypatch):
    import sys

    import exporters.models

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it imports
    monkeypatch.setattr(exporters.models, "resolve_model", lambda *arguments, **options: pytest.fail("loaded"))
    with pytest.raises(ExportError, match="needs ONNX Runtime, which is not installed: pip install onnxruntime"):
        api.run_export(api.ExportRequest("onnx", output=str(tmp_path / "lm.onnx")))
    assert os.listdir(tmp_path) == []
    api.check_options(api.ExportRequest("onnx", verify=False))  # --no-verify: no runtime needed
