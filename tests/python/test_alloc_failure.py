"""An allocation that fails in the middle of a load (issue #23), through the library as a
program embedding it meets it: the error names the unit and the device, what was allocated is
freed, and the same process loads again afterwards.

The memory is taken away with RLIMIT_AS in a child process (on a GPU machine the same happens
when another process takes device memory after planning). Each child sets its limit to its own
address-space size plus the checkpoint's mapping plus some headroom, and the headroom is swept,
so the test does not depend on how large a Python process is on this machine. Every outcome
is a success or an error that names the file, the unit or the thread: never a panic."""

import json
import struct
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import resource, sys, json
    import weightsmith

    model, small, headroom_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    mapped = 168 << 20
    limit = vm_bytes() + mapped + (headroom_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {}
    try:
        weightsmith.load(model, device_map="cpu", cache_seq_len=0, as_torch=False)
        out["first"] = "ok"
    except weightsmith.Error as e:
        out["first"] = "error"
        out["message"] = str(e)
    # The same process, the same limit: a small model loads, whatever happened above.
    tensors = weightsmith.load(small, device_map="cpu", as_torch=False)
    out["second"] = len(tensors)
    print(json.dumps(out))
    """
)


def sparse_checkpoint(path):
    """168 MB of BF16 zeros in four Llama-like layers (sparse on disk), with no config.json."""
    tensors, off = {}, 0
    for i in range(4):
        for m, shape in [("self_attn.q_proj", [2048, 2048]), ("mlp.up_proj", [4096, 2048]),
                         ("mlp.down_proj", [2048, 4096])]:
            n = shape[0] * shape[1] * 2
            tensors[f"model.layers.{i}.{m}.weight"] = {"dtype": "BF16", "shape": shape,
                                                       "data_offsets": [off, off + n]}
            off += n
    header = json.dumps(tensors).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + off)


def test_a_host_allocation_failing_mid_load_names_the_unit_and_the_process_loads_again(tmp_path, fixtures):
    model = tmp_path / "model.safetensors"
    sparse_checkpoint(model)
    small = fixtures / "models" / "tiny-llama"
    outcomes = {}
    for headroom in (40, 80, 120, 160, 190, 220, 240, 400):
        child = subprocess.run([sys.executable, "-c", CHILD, str(model), str(small), str(headroom)],
                               capture_output=True, text=True)
        assert child.returncode == 0, f"headroom {headroom} MB: {child.stderr[-2000:]}"
        out = json.loads(child.stdout.strip().splitlines()[-1])
        outcomes[headroom] = out
        assert out["second"] == 30, out
        if out["first"] == "error":
            message = out["message"]
            # Some limits fail before any unit (mapping the file, naming it); those that reach
            # the allocations name the unit and the device; past them, a thread that cannot
            # start says so (it was a panic: "the worker thread stopped without an answer").
            assert "model.safetensors" in message or "cannot start a thread" in message or (
                "loading layers." in message and "onto host" in message
                and "cannot allocate" in message), message
    print("outcomes by headroom (MB):", json.dumps(outcomes))
    mid_load = [h for h, o in outcomes.items()
                if o["first"] == "error" and "cannot allocate" in o["message"]]
    assert mid_load, f"no limit made an allocation fail mid-load: {outcomes}"
    assert any(o["first"] == "ok" for o in outcomes.values()), outcomes
