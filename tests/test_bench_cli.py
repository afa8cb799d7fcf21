"""``fastcl bench``: the command end to end on a tiny sweep, and the out-of-memory stop without
exhausting any memory (a fake runner, and child processes that only pretend)."""
import json
import subprocess
import sys

import pytest

from fastcl.benchmark import cases, cli, harness, sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {"device": "cpu", "cpu": "test", "threads": 1, "torch": "x", "fastcl": "x", "git_sha": "", "git_dirty": False}


def test_bench_command_writes_rows_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    import fastcl

    cmd = [sys.executable, "-m", "fastcl", "bench", "--n", "64,128", "--d", "16", "--losses", "clip,siglip",
           "--repeat", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_path,), (png_path,) = tmp_path.glob("*.json"), tmp_path.glob("*.png")
    assert png_path.stem == json_path.stem and png_path.read_bytes()[:8] == PNG_SIGNATURE
    assert str(png_path) in proc.stdout and "x floor" in proc.stdout  # the table went to stdout

    rows = json.loads(json_path.read_text())
    backends = ["auto", *(b for b in fastcl.backends("cpu") if b != "reference")]
    for n in (64, 128):
        assert [r["status"] for r in rows if r["impl"] == "floor" and r["n"] == n] == ["ok"]
        for loss in ("clip", "siglip"):
            got = {r["impl"]: r for r in rows if r["loss"] == loss and r["n"] == n}
            assert set(got) == set(sweep.implementations(loss, backends))
            for impl in ["naive", *backends]:
                r = got[impl]
                assert r["status"] == "ok", r
                assert r["x_floor"] > 0 and r["x_naive"] > 0 and r["peak_extra_bytes"] is not None
                assert r["d"] == 16 and r["dtype"] == "float32" and r["device"] == "cpu" and "torch" in r
            assert got["naive"]["x_naive"] == 1.0
            for anchor in cases.ANCHORS:  # installed or not, every anchor has its row
                if anchor in got:
                    assert got[anchor]["status"] in ("ok", "not installed", "unsupported")


def _fake_runner(oom_from: dict, calls: list, peak_per_row: int = 1000):
    """Measures nothing: "ok" with made-up numbers, or "oom" for impl at N >= oom_from[impl]."""
    def run(spec):
        calls.append((spec["loss"], spec["impl"], spec["n"]))
        if spec["n"] >= oom_from.get(spec["impl"], float("inf")):
            return {"status": "oom", "note": "DefaultCPUAllocator: can't allocate memory"}
        return {"status": "ok", "median_s": 1e-3 * spec["n"], "peak_extra_bytes": peak_per_row * spec["n"],
                "other_cpu_frac": 0.0}
    return run


def test_oom_stops_that_implementations_sweep_only(tmp_path):
    ns = [64, 128, 256, 512, 1024]
    specs = sweep.plan(["clip", "siglip"], ["chunked"], ["float32"], ns, 16, 1, "cpu")
    calls = []
    rows = sweep.run_sweep(specs, ENV, runner=_fake_runner({"chunked": 256}, calls))

    for loss in ("clip", "siglip"):
        ran = [n for (lo, impl, n) in calls if (lo, impl) == (loss, "chunked")]
        assert ran == [64, 128, 256]  # stopped at the first OOM: 512 and 1024 never started
        status = {r["n"]: (r["status"], r["note"]) for r in rows if (r["loss"], r["impl"]) == (loss, "chunked")}
        assert [status[n][0] for n in ns] == ["ok", "ok", "oom", "not run", "not run"]
        assert status[1024][1] == "out of memory at N=256"
        assert [n for (lo, impl, n) in calls if (lo, impl) == (loss, "naive")] == ns  # others go on
    assert all(r["x_naive"] is None for r in rows if r["status"] != "ok")

    columns, cells = cli.table_cells(rows)
    statuses = [c[columns.index("status")] for c in cells if c[1] == "chunked"]
    assert statuses.count("ok") == 4 and sum(s.startswith("OOM") for s in statuses) == 2
    pytest.importorskip("matplotlib")
    from fastcl.benchmark import plot

    assert plot.plot(rows, tmp_path / "oom.png").read_bytes()[:8] == PNG_SIGNATURE


def test_naive_is_skipped_over_the_cap_without_running(tmp_path):
    specs = sweep.plan(["clip"], [], ["float32"], [64, 1024], 16, 1, "cpu")
    calls = []
    # 5 copies of 1024^2 fp32 is 20 MiB: over a 0.01 GiB cap, while 64^2 is far under it. Tiny
    # cases really do read 0 B of extra resident memory; the figure must still be drawn.
    rows = sweep.run_sweep(specs, ENV, max_naive_gib=0.01, runner=_fake_runner({}, calls, peak_per_row=0))
    naive = {r["n"]: r for r in rows if r["impl"] == "naive"}
    assert naive[64]["status"] == "ok" and naive[1024]["status"] == "skipped"
    assert "--max-naive-gib" in naive[1024]["note"] and ("clip", "naive", 1024) not in calls
    for r in rows:  # an anchor that cannot run here says why ("not installed", "unsupported")
        if r["impl"] in cases.ANCHORS and cases.unavailable(r["impl"], "clip", "cpu"):
            assert r["status"] == cases.unavailable(r["impl"], "clip", "cpu")[0]
    pytest.importorskip("matplotlib")
    from fastcl.benchmark import plot

    assert plot.plot(rows, tmp_path / "zero.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("body, status", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "oom"),  # what the OOM killer leaves
    ("raise RuntimeError(\"DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes\")", "oom"),
    ("raise ValueError('a bug')", "failed"),
    ("print('{\"status\": \"ok\", \"median_s\": 1.0}')", "ok"),
])
def test_isolated_case_outcomes(tmp_path, body, status):
    script = tmp_path / "case.py"
    script.write_text(body + "\n")
    assert harness.run_isolated(str(script), {"n": 1})["status"] == status


def test_in_process_oom_is_a_result_not_a_crash(monkeypatch):
    def make_step(spec):
        raise MemoryError("pretend")
    monkeypatch.setattr(cases, "make_step", make_step)
    assert cases.run_case({"impl": "naive", "loss": "clip", "n": 8, "d": 4, "repeat": 1})["status"] == "oom"
    monkeypatch.setattr(cases, "make_step", lambda spec: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cases.run_case({"impl": "naive", "loss": "clip", "n": 8, "d": 4, "repeat": 1})


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere between words
    for action in cli.build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        shown = "auto and all available here but reference" if action.default is None else action.default
        assert f"default: {shown}" in text or f"default: cuda when torch sees a GPU, else cpu; here {shown}" in text, (
            f"{action.option_strings[0]} does not show its default {shown!r}")


def test_string_defaults_parse_to_the_values():
    args = cli.parse_args([])
    assert args.losses == ["clip", "siglip"] and args.dtype == ["float32"] and args.n == [512, 1024, 2048, 4096]
    assert args.out_dir.name == "fastcl-bench" and args.d == 512 and args.repeat == 3


def test_floor_is_per_loss(capsys):
    """SigLIP (and MW) compute their gradients in the forward pass: 3 GEMMs, against the lse losses' 4.
    With every case timed alike, SigLIP is then 4/3 of its floor where CLIP is at its floor, in the
    rows, the table and the figure's floor line."""
    assert {loss: cases.floor_gemms(loss) for loss in (*cases.LOSSES, "mw")} == {
        "clip": 4, "siglip": 3, "ntxent": 4, "supcon": 4, "mw": 3,
        "maxsim": 2 * cases.MAXSIM_LQ * cases.MAXSIM_LD}  # its token GEMM, forward and backward, in x @ y.T units
    specs = sweep.plan(["clip", "siglip", "ntxent", "supcon"], ["chunked"], ["float32"], [64, 128], 16, 1, "cpu")
    rows = sweep.run_sweep(specs, ENV, runner=_fake_runner({}, []))
    for r in (r for r in rows if r["status"] == "ok"):  # anchors not installed here have no ratio
        want = {"gemm": 1.0, "clip": 1.0, "ntxent": 1.0, "supcon": 1.0, "siglip": 4 / 3}[r["loss"]]
        assert r["x_floor"] == pytest.approx(want), r
        assert r["floor_gflops"] == pytest.approx(r["floor_gemms"] * 2 * r["n"] ** 2 * r["d"] / r["median_s"] / 1e9)

    columns, cells = cli.table_cells(rows)
    x_floor = {(c[0], c[2]): c[columns.index("x floor")] for c in cells if c[1] == "chunked"}
    assert x_floor[("clip", "64")] == "1.00" and x_floor[("siglip", "64")] == "1.33"
    cli.show(rows)
    assert "GEMM floor" in capsys.readouterr().out

    pytest.importorskip("matplotlib")
    from fastcl.benchmark import plot

    clip_n, clip_ms, clip_label = plot.floor_line(rows, "clip", "float32")
    siglip_n, siglip_ms, siglip_label = plot.floor_line(rows, "siglip", "float32")
    assert clip_n == siglip_n == [64, 128] and clip_ms == pytest.approx([64.0, 128.0])
    assert siglip_ms == pytest.approx([0.75 * ms for ms in clip_ms])
    assert clip_label.startswith("GEMM floor (4 x") and siglip_label.startswith("GEMM floor (3 x")


def test_paired_runs_time_a_points_implementations_together(monkeypatch):
    """--paired 3: after a point's separate cases, three processes time those that ran (naive first)
    interleaved, and the medians of their ratios land in the rows; a point without naive is not paired."""
    specs = sweep.plan(["clip"], ["chunked"], ["float32"], [64, 1024], 16, 1, "cpu", paired=3)
    assert [s["impl"] for s in specs if s["loss"] == "clip"] == \
        [*sweep.implementations("clip", ["chunked"]), "paired"] * 2
    calls, paired = [], []
    fake = _fake_runner({}, calls)

    def runner(spec):
        if "paired" not in spec:
            return fake(spec)
        paired.append([s["impl"] for s in spec["paired"]])
        x = (0.5, 0.9, 0.6)[len(paired) - 1]  # three processes, three ratios: their median lands in the row
        return {"status": "ok", "paired": {s["impl"]: {"median_s": 1.0, "x_first": 1.0 if s["impl"] == "naive" else x,
                                                       "rounds": 3} for s in spec["paired"]}}
    rows = sweep.run_sweep(specs, ENV, max_naive_gib=0.01, runner=runner)
    assert paired == [[r["impl"] for r in rows if r["n"] == 64 and r["status"] == "ok" and r["loss"] == "clip"]] * 3
    assert paired[0][0] == "naive" and "chunked" in paired[0]  # N = 1024: naive skipped, nothing to pair
    got = {(r["impl"], r["n"]): r for r in rows}
    assert got[("chunked", 64)]["x_naive_paired"] == 0.6 and got[("naive", 64)]["x_naive_paired"] == 1.0
    assert got[("chunked", 64)]["x_naive_paired_runs"] == [0.5, 0.9, 0.6]
    assert got[("chunked", 1024)]["x_naive_paired"] is None and not any(r["impl"] == "paired" for r in rows)
    columns, cells = cli.table_cells(rows)
    assert "x naive paired" in columns and all(len(c) == len(columns) for c in cells)


def test_run_paired_interleaves_real_steps(monkeypatch):
    monkeypatch.setattr(cases, "MIN_TIMED_SECONDS", 0.0)
    base = {"loss": "clip", "n": 8, "d": 4, "dtype": "float32", "repeat": 3, "device": "cpu"}
    out = cases.run_case({**base, "paired": [{**base, "impl": "naive"}, {**base, "impl": "auto"}]})
    assert out["status"] == "ok" and set(out["paired"]) == {"naive", "auto"}
    assert out["paired"]["naive"]["x_first"] == 1.0 and out["paired"]["auto"]["rounds"] == 3
    assert out["paired"]["auto"]["x_first"] > 0


def test_interleaved_rounds_rotate_the_order():
    seen = []
    steps = {name: (lambda name=name: seen.append(name)) for name in "abc"}
    times = harness.time_interleaved(steps, 0.0, 3)
    assert [len(t) for t in times.values()] == [3, 3, 3]
    assert seen == list("abc" "bca" "cab")
