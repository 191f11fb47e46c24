"""Every verb from Python on the shipped fixtures: the CLI's reports, the CLI's bytes, its errors."""

import hashlib
import json
import threading

import pytest

import weightsmith


def test_inspect_is_the_cli_json(fixtures, cli):
    report = weightsmith.inspect(fixtures / "models/tiny-llama")
    out = cli("inspect", fixtures / "models/tiny-llama", "--json")
    assert out.returncode == 0, out.stderr
    assert report == json.loads(out.stdout)
    assert report["problems"] == []


def test_plan_takes_devices_as_a_list(fixtures):
    plan = weightsmith.plan(fixtures / "models/tiny-llama", devices=["2GiB", "2GiB"], cache_seq_len=64)
    assert [d["name"] for d in plan["devices"]] == ["cuda:0", "cuda:1"]
    assert plan["model"].endswith("tiny-llama")


def test_a_plan_edited_by_hand_comes_back_as_a_device_map(fixtures):
    path = fixtures / "models/tiny-llama"
    plan = weightsmith.plan(path, devices=["2GiB", "2GiB"], cache_seq_len=64)
    for unit in plan["units"]:
        unit["device"] = 1 if unit["name"] in ("layers.2", "norm", "head") else 0
    fixed = weightsmith.plan(path, devices=["2GiB", "2GiB"], cache_seq_len=64, device_map=plan)
    assert fixed["strategy"] == "fixed"
    assert fixed["devices"][1]["units"] == ["layers.2", "norm", "head"]


def files_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_merge_gives_the_cli_bytes(fixtures, cli, tmp_path):
    base, adapter = fixtures / "models/tiny-llama", fixtures / "adapters/llama-lora/adapter"
    report = weightsmith.merge(base, [adapter], tmp_path / "py", device="cpu", verify=True)
    assert report["verify"]["max_ulps"] <= 1
    out = cli("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "cli", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert files_digest(tmp_path / "py") == files_digest(tmp_path / "cli")


def test_weighted_adapters_and_progress(fixtures, tmp_path):
    seen = []
    case = fixtures / "adapters/llama-two-weighted"
    weightsmith.merge(fixtures / "models/tiny-llama", [(case / "adapter", 1.0), (case / "adapter2", 0.5)],
                      tmp_path / "m", device="cpu", progress=lambda d, t, what: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]


def test_an_interrupt_during_a_merge_leaves_nothing(fixtures, tmp_path):
    def stop(done, total, what):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        weightsmith.merge(fixtures / "models/tiny-llama", [fixtures / "adapters/llama-lora/adapter"],
                          tmp_path / "m", device="cpu", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_errors_name_what_is_wrong(fixtures, tmp_path):
    with pytest.raises(FileNotFoundError):
        weightsmith.inspect(tmp_path / "nothing/here/at/all")
    with pytest.raises(weightsmith.Error, match=r"adapter_model.safetensors: module .* \(an adapter for another model\?\)"):
        # An adapter for another model: its modules name tensors the base does not have.
        weightsmith.merge(fixtures / "models/tiny-gpt2", [fixtures / "adapters/llama-lora/adapter"],
                          tmp_path / "m", device="cpu")
    with pytest.raises(ValueError, match="--dtype"):
        weightsmith.merge(fixtures / "models/tiny-llama", [fixtures / "adapters/llama-lora/adapter"],
                          tmp_path / "m", dtype="f32", device="cpu")
    with pytest.raises(weightsmith.Error, match="the output"):
        weightsmith.merge(fixtures / "models/tiny-llama", [fixtures / "adapters/llama-lora/adapter"],
                          fixtures / "models/tiny-llama", force=True, device="cpu")


def test_publish_dry_run(fixtures, tmp_path):
    weightsmith.merge(fixtures / "models/tiny-llama", [fixtures / "adapters/llama-lora/adapter"],
                      tmp_path / "m", device="cpu")
    summary = weightsmith.publish(tmp_path / "m", "me/tiny", dry_run=True, base_model="org/base")
    assert summary["dry_run"] is True
    assert 'base_model: "org/base"' in summary["card"]


def test_long_calls_release_the_gil(fixtures, tmp_path):
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    t = threading.Thread(target=tick)
    t.start()
    try:
        for i in range(3):
            weightsmith.merge(fixtures / "models/tiny-llama", [fixtures / "adapters/llama-lora/adapter"],
                              tmp_path / f"m{i}", device="cpu", verify=True)
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 5


def test_the_console_script_is_the_cli(cli):
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("weightsmith ")
    assert cli("inspect", "no/such/path/anywhere/x").returncode == 1
