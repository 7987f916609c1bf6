"""The output's manifest (pipeline/manifest.py, schemas/manifest.py): what it records, which settings a resume may
change, and manifests written before it was versioned."""

from __future__ import annotations

import dataclasses
import json

import pytest

from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.job import job_from_keywords
from blipbatch.pipeline.manifest import (
    RESUME_MAY_CHANGE,
    ManifestMismatch,
    check_manifest,
    ensure_manifest,
    job_settings,
    read_manifest,
    recorded_job,
    write_manifest,
)
from blipbatch.schemas import MANIFEST_VERSION, JobSettings


def a_job(output: str, **changes):
    settings = dict(
        prompt="Describe:",
        max_new_tokens=12,
        dtype="float32",
        device="cpu",
        batch_size=4,
        decode_slots=16,
        workers=2,
        fetch=FetchConfig(local_roots=("/data/images",), allow_hosts=("10.0.0.0/8",), timeout_s=3.0),
    )
    return job_from_keywords("s3://bucket/in/", output, "s3://key:secret@bucket/model", **(settings | changes))


def test_the_manifest_records_every_setting_that_shapes_the_output(tmp_path):
    output = str(tmp_path / "out")
    job = a_job(output)
    ensure_manifest(output, job_settings(job).to_dict())
    stored = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert stored["version"] == MANIFEST_VERSION
    settings = stored["settings"]
    assert settings["fetch"]["local_roots"] == ["/data/images"] and settings["fetch"]["allow_hosts"] == ["10.0.0.0/8"]
    assert settings["fetch"]["timeout_s"] == 3.0 and settings["decode"]["max_pixels"] == job.decode.max_pixels
    assert (settings["dtype"], settings["device"], settings["quantize"]) == ("float32", "cpu", None)
    assert settings["run"] == {
        "workers": 2,
        "max_workers": None,
        "batch_size": 4,
        "decode_slots": 16,
        "max_attempts": 3,
        "max_error_rate": 1.0,
        "prepare_threads": None,
        "decoded_bytes": job.run.decoded_bytes,
        "max_instruction_bytes": job.run.max_instruction_bytes,
        "max_candidates": 256,
        "decode_processes": None,
    }
    assert settings["generation"] == {"max_new_tokens": 12, "num_beams": 1}
    assert "secret" not in (tmp_path / "out" / "_manifest.json").read_text()  # credentials in URLs are redacted
    # read back, it is the same job (the redacted model URL aside)
    again = recorded_job(read_manifest(output), output)
    assert again == dataclasses.replace(job, model=dataclasses.replace(job.model, path=settings["model"]))


def test_resume_may_change_fetch_decode_device_and_run_but_not_what_an_ok_row_means(tmp_path):
    assert RESUME_MAY_CHANGE == {"fetch", "decode", "device", "run", "version"}
    output = str(tmp_path / "out")
    write_manifest(output, job_settings(a_job(output)).to_dict())
    relaxed = a_job(output, batch_size=16, workers=1, device="cuda", fetch=FetchConfig(local_roots=("/other",)))
    assert check_manifest(output, job_settings(relaxed).to_dict()) == "updated"
    for change in (
        {"prompt": "Other:"},
        {"max_new_tokens": 13},
        {"dtype": "bfloat16"},
        {"rows_per_unit": 10},
        {"image_column": "url"},
        {"quantize": "fp8"},
    ):
        with pytest.raises(ManifestMismatch) as info:
            check_manifest(output, job_settings(a_job(output, **change)).to_dict())
        assert "--force" in str(info.value)
        assert check_manifest(output, job_settings(a_job(output, **change)).to_dict(), force=True) == "replaced"


def test_a_version_1_manifest_still_reads_and_resumes(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    job = a_job(str(output))
    old = {
        k: v
        for k, v in job_settings(job).to_dict().items()
        if k in ("input", "model", "instructions", "mapping", "generation", "rows_per_unit")
    }
    (output / "_manifest.json").write_text(
        json.dumps({"fingerprint": "0123", "settings": old, "written_at": "2026-01-01T00:00:00+00:00"})
    )
    recorded = read_manifest(str(output))
    assert isinstance(recorded, JobSettings) and recorded.version == 1 and recorded.fetch is None
    assert recorded_job(recorded, str(output)).fetch == FetchConfig()  # not recorded then: the defaults
    # settings version 1 did not record are unknown, not different: the resume goes on and records them
    assert ensure_manifest(str(output), job_settings(job).to_dict()) == "updated"
    assert read_manifest(str(output)).version == MANIFEST_VERSION
    assert read_manifest(str(tmp_path / "none")) is None
