"""Tests of AlpacaEval's file formats: round trips, the shared reference files, bad files."""

import json
import math

import pytest

from harness.core.cache import shared_data_dir
from harness.core.errors import DataError
from harness.data.alpaca_formats import (
    Annotation,
    ModelOutput,
    annotations_frame,
    read_annotations,
    read_annotations_frame,
    read_model_outputs,
    write_annotations,
    write_model_outputs,
)

SHARED = shared_data_dir() / "alpaca_eval"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared AlpacaEval data absent")


def test_model_outputs_round_trip(tmp_path):
    outputs = [
        ModelOutput("Say hi", "Hi! ¿Qué tal? 你好", "my-model", "helpful_base"),
        ModelOutput("Count", "1 2 3", "my-model", "", extra={"finish_reason": "eos"}),
    ]
    path = tmp_path / "sub" / "model_outputs.json"
    write_model_outputs(path, outputs)
    assert read_model_outputs(path) == outputs
    records = json.loads(path.read_text(encoding="utf-8"))
    assert set(records[0]) == {"instruction", "output", "generator", "dataset"}
    assert records[1]["finish_reason"] == "eos"


def test_annotations_round_trip_keeps_missing_preference(tmp_path):
    anns = [
        Annotation("q1", "ref", "mine", 1.75, "gpt4_1106_preview", "mine", "judge",
                   {"logprobs": [-0.1, -2.3]}, 0.0012, "oasst"),
        Annotation("q2", "ref", "mine", None, "gpt4_1106_preview", "mine", "judge",
                   "unparsable", None, "", extra={"time_per_example": 0.5}),
    ]
    path = tmp_path / "annotations.json"
    write_annotations(path, anns)
    assert read_annotations(path) == anns
    assert json.loads(path.read_text())[1]["preference"] is None
    frame = annotations_frame(anns)
    assert frame["preference"].iloc[0] == 1.75
    assert math.isnan(frame["preference"].iloc[1])


@needs_shared
def test_reads_the_shared_reference_files():
    outputs = read_model_outputs(SHARED / "gpt4_1106_preview_outputs.json")
    assert len(outputs) == 805
    assert {o.generator for o in outputs} == {"gpt4_1106_preview"}
    frame = read_annotations_frame(SHARED / "annotations" / "phi-2.json")
    assert len(frame) == 803
    assert frame["preference"].between(1, 2).all()
    assert set(frame["generator_1"]) == {"gpt4_1106_preview"}


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"instruction": "x"}', "expected a JSON list"),
    ("[]", "holds no"),
    ('["just a string"]', "record 0 is str"),
    ('[{"instruction": "x", "output_1": "a", "output_2": "b"}]', "lacks the key 'preference'"),
    ('[{"instruction": "x", "output_1": "a", "preference": 2}]', "lacks the key 'output_2'"),
    ('[{"instruction": "x", "output_1": "a", "output_2": "b", "preference": "B"}]',
     "preference='B'"),
    ('[{"instruction": "x", "output_1": 3, "output_2": "b", "preference": 2}]',
     "output_1=3"),
])
def test_bad_annotation_files_raise_one_line_data_errors(tmp_path, content, message):
    path = tmp_path / "annotations.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_annotations(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text


def test_missing_and_malformed_model_outputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_model_outputs(tmp_path / "absent.json")
    path = tmp_path / "model_outputs.json"
    path.write_text('[{"instruction": "x"}]')
    with pytest.raises(DataError, match="lacks the key 'output'"):
        read_model_outputs(path)
    path.write_bytes(b"\xff\xfe[")
    with pytest.raises(DataError, match="cannot read"):
        read_model_outputs(path)
