"""``fastcl doctor``: runs clean here, and names each problem it is built to find (a Triton older
than the supported range, a driver older than torch's CUDA, cubins that do not run on the GPU, a
backend giving wrong results). Problems are faked at the level of the findings' inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastcl import _cuda_driver
from fastcl import _doctor as doctor
from fastcl import backend as backends
from fastcl.backend.chunked import lse as chunked_lse
from fastcl.backend.chunked import pointwise as chunked_pointwise
from fastcl.backend.triton import versions

CPU = torch.device("cpu")


def _statuses(findings, status):
    return [f for f in findings if f.status == status]


def test_command_line_exits_zero_here():
    out = subprocess.run([sys.executable, "-m", "fastcl", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No problems found." in out.stdout
    assert "probes on cpu" in out.stdout and "backends on cpu" in out.stdout


def test_json_lists_every_backend_and_probes_the_usable_ones(capsys):
    assert doctor.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == 0
    listed = {f["subject"] for f in report["findings"] if f["section"] == "backends on cpu"}
    assert listed == set(backends.names())
    probed = {f["subject"]: f for f in report["findings"] if f["section"] == "probes on cpu"}
    assert set(probed) == set(backends.available("cpu")) - {"reference"}
    for finding in probed.values():
        assert finding["status"] == "ok"
        assert finding["data"]["max_relative_error"] <= finding["data"]["tolerance"]


def test_triton_older_than_the_range_is_a_problem(monkeypatch, capsys):
    monkeypatch.setattr(versions, "installed", lambda: "3.3.1")
    [finding] = doctor.triton_findings()
    assert finding.status == doctor.PROBLEM
    assert "3.3.1" in finding.detail and "older than the oldest" in finding.detail
    assert doctor.main(["--no-probe"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "Triton 3.3.1" in out and "1 problem found: triton: triton" in out


def test_triton_newer_than_tested_is_a_note(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda: "3.12.0")
    [finding] = doctor.triton_findings()
    assert finding.status == doctor.NOTE and "newer than the newest" in finding.detail


def test_driver_older_than_torchs_cuda_is_a_problem(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "driver_cuda_version", lambda: (12, 2))
    monkeypatch.setattr(doctor, "_cuda_available", lambda: False)  # what torch says with a too-old driver
    # a build without CUDA kernels: with them (CUDA 13 here), the driver would be too old for those too
    monkeypatch.setattr(doctor, "_extension_info", lambda: {"cuda_archs": "", "cuda_version": ""})
    findings = doctor.cuda_findings()
    [problem] = _statuses(findings, doctor.PROBLEM)
    assert problem.subject == "driver vs torch"
    assert problem.detail == "the driver supports CUDA 12.2, torch needs >= 13.0"
    assert "update the NVIDIA driver" in problem.fix and "580" in problem.fix
    assert doctor.exit_status(findings) == 1


def test_driver_of_an_older_minor_runs_under_minor_version_compatibility():
    [finding] = doctor.driver_findings((12, 4), {"torch": (12, 8)})
    assert finding.status == doctor.NOTE and "minor version compatibility" in finding.detail
    [finding] = doctor.driver_findings((13, 0), {"torch": (12, 8), "fastcl._C": (13, 0)})[1:]
    assert finding.status == doctor.OK


def test_driver_older_than_the_kernels_cuda_is_a_problem_under_a_torch_it_runs(monkeypatch):
    """A torch for CUDA 12 on a driver for 12.4 is fine; fastcl._C built by nvcc 13 (static runtime) is not."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(doctor, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(doctor, "_cuda_available", lambda: False)
    monkeypatch.setattr(doctor, "_extension_info", lambda: {"cuda_archs": "80,90a", "cuda_version": "13.0"})
    [problem] = _statuses(doctor.cuda_findings(), doctor.PROBLEM)
    assert problem.subject == "driver vs fastcl._C"
    assert problem.detail == "the driver supports CUDA 12.4, fastcl._C needs >= 13.0"
    assert "R580 or newer" in problem.fix and "rebuild fastcl with the nvcc of CUDA 12.x" in problem.fix


@pytest.mark.parametrize("driver, built", [((12, 4), (13, 0)), ((13, 0), (13, 2)), ((13, 0), (13, 0)),
                                           ((13, 1), (12, 8)), ((11, 8), (12, 0))])
def test_doctor_and_the_cuda_backend_apply_one_driver_rule(driver, built):
    """What doctor calls a problem is exactly what the cuda backend refuses (fastcl/_cuda_driver.py)."""
    [finding] = doctor.driver_findings(driver, {"fastcl._C": built})
    refusal = _cuda_driver.extension_problem(driver, built)
    assert (finding.status == doctor.PROBLEM) == (refusal is not None)


def test_cpu_torch_without_a_driver_is_only_a_note(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(doctor, "driver_cuda_version", lambda: None)
    [finding] = doctor.cuda_findings()
    assert finding.status == doctor.NOTE


@pytest.mark.parametrize("capability, runs", [((8, 0), True), ((8, 9), True), ((9, 0), True), ((7, 5), False),
                                              ((10, 0), False), ((12, 0), False)])
def test_cubins_against_the_gpu(capability, runs):
    findings = doctor.arch_findings("cuda:0", capability, ["80", "90a"])
    assert [f.status for f in findings] == [doctor.OK if runs else doctor.PROBLEM]
    assert doctor.arch_findings("cuda:0", capability, []) == []


def test_cubin_rules():
    assert doctor.arch_runs_on("90a", (9, 0)) and not doctor.arch_runs_on("90a", (9, 1))
    assert doctor.arch_runs_on("86-real", (8, 9)) and not doctor.arch_runs_on("86", (8, 0))


def _wrong_lse_forward(right):
    def wrong(*args, **kwargs):
        row, col = right(*args, **kwargs)
        return row + 0.25, col
    return wrong


def test_backend_with_wrong_results_fails_its_probe(monkeypatch):
    monkeypatch.setattr(chunked_lse, "lse_forward", _wrong_lse_forward(chunked_lse.lse_forward))
    findings = {f.subject: f for f in doctor.probe_findings(CPU)}
    assert findings["chunked"].status == doctor.PROBLEM
    assert "WRONG RESULTS" in findings["chunked"].detail and "(clip d" in findings["chunked"].detail
    assert findings["chunked"].data["max_relative_error"] > 1e-3
    assert all(f.status == doctor.OK for name, f in findings.items() if name != "chunked")


def test_backend_that_raises_fails_its_probe(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(chunked_pointwise, "pointwise", broken)
    finding = doctor.probe("chunked", CPU)
    assert finding.status == doctor.PROBLEM and "no kernel image" in finding.detail


def test_probe_in_float32_where_a_backend_takes_no_float64(monkeypatch):
    def no_float64(name, device, dtype, real=backends.not_supported_reasons):
        return ["no float64 here"] if (name, dtype) == ("chunked", torch.float64) else real(name, device, dtype)

    monkeypatch.setattr(backends, "not_supported_reasons", no_float64)
    finding = doctor.probe("chunked", CPU)
    assert finding.status == doctor.OK and finding.data["dtype"] == "float32"
    assert finding.data["tolerance"] == doctor.TOLERANCE[torch.float32]
